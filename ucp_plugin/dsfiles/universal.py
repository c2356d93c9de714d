"""Read a folder written by DeepSpeed's own converter (``python -m deepspeed.checkpoint.ds_to_universal``)
as a *source* for ``load.py``, so ``engine.load_checkpoint`` with the plugin resumes from it at any DP
size and ZeRO stage.

Such a folder holds, per trainable parameter, ``zero/<name>/{fp32,exp_avg,exp_avg_sq,...}.pt`` (the
whole consolidated tensor: a dict ``{"param": tensor, "cat_dim": ...}`` from a ZeRO-1/2 checkpoint, a
bare flat tensor from a ZeRO-3 one) and, for ZeRO-1/2, ``step.pt``; ``zero/optimizer_state.pt`` (param
groups, loss scaler, and for ZeRO-3 the optimizer's per-sub-group ``step``); and copies of the
checkpoint's model-states files, which give the parameter order and shapes, frozen parameters, buffers,
the LR scheduler and the engine counters. Every file is read with ``native.safe_load``
(``ptfile.PtFile``: an allowlist unpickler, DeepSpeed's metadata classes mapped to inert stand-ins).
"""
from __future__ import annotations

import glob
import math
import os

import torch

from ..errors import FormatError, UnsupportedError
from ..format import Atom, dtype_name, scalar_value
from . import native
from .native import SPLIT

ZERO_DIR, OPTIMIZER_FILE, WEIGHT_FILE = "zero", "optimizer_state.pt", "fp32.pt"
SCALAR_FILES = ("step.pt",)


def is_ds_universal(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, ZERO_DIR, OPTIMIZER_FILE)) and native.is_native(folder)


def _tensor(obj, path: str) -> torch.Tensor:
    """The tensor a ``zero/<name>/<state>.pt`` file holds (ZeRO-1/2 wrap it in a dict)."""
    t = obj.get("param") if isinstance(obj, dict) else obj
    if not torch.is_tensor(t):
        raise FormatError(f"{path}: holds no tensor (a dict with 'param' or a tensor); re-run ds_to_universal")
    return t


class DsUniversalSource:
    """A ``ds_to_universal`` folder behind the source interface (``sources.py``)."""

    def __init__(self, folder: str):
        self.path = folder
        self.model = native.safe_load(native.model_states_file(folder, 0))
        self.dp = int(self.model.get("dp_world_size", 1))
        if self.model.get("mp_world_size", 1) != 1:
            raise UnsupportedError(f"{folder}: model-parallel DeepSpeed universal folders are not supported "
                                   "here (use the Megatron-DeepSpeed binding)")
        self.stage = int(((self.model.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0))
        self.optim = native.safe_load(os.path.join(folder, ZERO_DIR, OPTIMIZER_FILE))
        self.buffer_names = list(self.model.get("buffer_names") or [])
        self._cache: dict[str, torch.Tensor] = {}
        self.atoms = self._atoms()

    def _file(self, name: str, state: str) -> str:
        return os.path.join(self.path, ZERO_DIR, name, f"{state}.pt")

    def _trainable(self) -> dict[str, tuple[int, ...]]:
        groups = self.model.get("param_shapes") or []
        if not groups:
            raise FormatError(f"{self.path}: the model-states file has no param_shapes; not a ZeRO checkpoint")
        return {n: tuple(s) for g in groups for n, s in g.items()}

    def _param_atom(self, name: str, shape: tuple[int, ...], scalars: dict) -> Atom:
        weight = self._file(name, "fp32")
        if not os.path.isfile(weight):
            raise FormatError(f"{weight}: missing; parameter {name!r} has no {WEIGHT_FILE} in this DeepSpeed "
                              "universal folder (an interrupted ds_to_universal?): re-run the conversion")
        states = {}
        for path in sorted(glob.glob(os.path.join(self.path, ZERO_DIR, name, "*.pt"))):
            base = os.path.basename(path)
            if base not in SCALAR_FILES:
                states[base[:-3]] = dtype_name(self._load(name, base[:-3]).dtype)
        return Atom(name, "param", shape, SPLIT, states, scalars)

    def _atoms(self) -> dict[str, Atom]:
        atoms, expected = {}, None
        for name, shape in self._trainable().items():
            atom = self._param_atom(name, shape, self._scalars(name))
            if expected is None:
                expected = set(atom.states)
            missing = sorted(expected - set(atom.states))
            if missing:
                raise FormatError(f"{self._file(name, missing[0])}: missing; parameter {name!r} lacks optimizer "
                                  f"state(s) {missing} the others have: re-run ds_to_universal")
            atoms[name] = atom
        module = self.model["module"]
        for name, shape in (self.model.get("frozen_param_shapes") or {}).items():
            atoms[name] = Atom(name, "frozen", tuple(shape), SPLIT, {"param": dtype_name(self._frozen_dtype(name))})
        for name in self.buffer_names:
            atoms[name] = Atom(name, "buffer", tuple(module[name].shape), SPLIT,
                               {"param": dtype_name(module[name].dtype)})
        return atoms

    def _frozen_dtype(self, name: str) -> torch.dtype:
        fragments = self.model.get("frozen_param_fragments") or {}
        return (fragments[name] if name in fragments else self.model["module"][name]).dtype

    def _scalars(self, name: str) -> dict:
        path = os.path.join(self.path, ZERO_DIR, name, "step.pt")
        if os.path.isfile(path):
            return {"step": scalar_value(native.safe_load(path))}
        # ZeRO-3: the folder keeps the optimizer's own state dict, one ``step`` per sub-group
        steps = [scalar_value(e["step"]) for e in ((self.optim.get("optimizer_state_dict") or {}).get("state") or {})
                 .values() if "step" in e]
        return {"step": max(steps)} if steps else {}

    def _load(self, name: str, state: str) -> torch.Tensor:
        key = f"{name}/{state}"
        if key not in self._cache:
            path = self._file(name, state)
            if not os.path.isfile(path):
                raise FormatError(f"{path}: missing; parameter {name!r} has no {state!r} file: re-run "
                                  "ds_to_universal")
            self._cache[key] = _tensor(native.safe_load(path), path).reshape(-1)
        return self._cache[key]

    def read(self, name: str, state: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        meta = self.atoms[name]
        if meta.kind == "param":
            return self._load(name, state)[start:stop].to(dtype)
        if meta.kind == "buffer":
            return self.model["module"][name].reshape(-1)[start:stop].to(dtype)
        return self._frozen(name, meta)[start:stop].to(dtype)

    def _frozen(self, name: str, meta: Atom) -> torch.Tensor:
        """A frozen parameter: ZeRO-1/2 keep it whole in the module; ZeRO-3 partitions it over the saved
        DP ranks' model-states files (``frozen_param_fragments``)."""
        if self.stage != 3:
            return self.model["module"][name].reshape(-1)
        numel = math.prod(meta.shape)
        parts = [native.safe_load(native.model_states_file(self.path, r))["frozen_param_fragments"][name]
                 .reshape(-1) for r in range(self.dp)]
        return torch.cat(parts)[:numel] if numel else torch.zeros(0)

    def common_state(self) -> dict:
        return native.common_state(self.model, self.optim.get("param_groups") or [], self.optim)

    def rank_state(self, rank: int, world_size: int) -> None:
        return None  # DeepSpeed saves no RNG states

    def bytes(self) -> None:
        return None  # files are mapped whole

