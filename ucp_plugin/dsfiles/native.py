"""Read a native DeepSpeed checkpoint (``engine.save_checkpoint`` without this plugin) as a *source* for
``load.py``, so it can be loaded on any DP size / ZeRO stage / dtype.

Files are read by ``ptfile.PtFile`` (an allowlist unpickler, as ``torch.load(weights_only=True)``,
without torch: tensors are NumPy arrays over a mapping of the file). DeepSpeed's optimizer files
pickle a few of its own classes (``LossScaler``, ``ZeroStageEnum``, ``fragment_address``); those
names are mapped to the inert stand-ins below, so no DeepSpeed (or other) code runs while reading,
and any other class is refused. The saved layout (DP size, ZeRO stage, wrapper, param groups in flat
order) comes from the model-states file; ``plan.zero`` then says which saved rank's file holds which
element of each parameter, and only those files are opened. The loader's ``read`` returns torch
tensors; ``view`` and ``fill`` (the offline converter's) work on NumPy arrays, so it never needs torch.
"""
from __future__ import annotations

import glob
import math
import os
import threading

import numpy as np

from ..errors import FormatError, UnsupportedError
from ..format import Atom, is_scalar, scalar_value
from ..language import Replicated
from ..plan import zero as Z
from ..storage.files import array_dtype_name, numpy_dtype
from .ptfile import PtFile, as_torch

SPLIT = Replicated().to_json()  # a plain DeepSpeed parameter is never split over TP
DS_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
           "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
           "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size",
           "checkpoint_parallel_dimensions", "ds_config", "ds_version", "universal_checkpoint_info"}


class LossScaler:
    """Stand-in for deepspeed.runtime.fp16.loss_scaler.LossScaler: holds the pickled attributes."""


class DynamicLossScaler(LossScaler):
    """Stand-in for deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler."""


class ZeroStageEnum(int):
    """Stand-in for deepspeed.runtime.zero.config.ZeroStageEnum (an int enum)."""


class FragmentAddress:
    """Stand-in for deepspeed.utils.tensor_fragment.fragment_address."""


CLASSES = {("deepspeed.runtime.fp16.loss_scaler", "LossScaler"): LossScaler,
           ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"): DynamicLossScaler,
           ("deepspeed.runtime.zero.config", "ZeroStageEnum"): ZeroStageEnum,
           ("deepspeed.utils.tensor_fragment", "fragment_address"): FragmentAddress}


def safe_load(path: str) -> dict:
    """A DeepSpeed ``.pt`` file's object with torch tensors (``PtFile`` plus ``as_torch``)."""
    return as_torch(PtFile(path, CLASSES).obj)


def _tensors(entry: dict) -> dict[str, np.ndarray]:
    """The per-element states of an optimizer state entry (arrays of at least one dimension)."""
    return {k: v for k, v in entry.items() if isinstance(v, np.ndarray) and v.ndim > 0}


def is_native(folder: str) -> bool:
    return bool(glob.glob(os.path.join(folder, "*model_states.pt")))


def model_states_file(folder: str, rank: int) -> str:
    for name in (f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", "mp_rank_00_model_states.pt"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise FormatError(f"{folder}: no model-states file for DP rank {rank}; the checkpoint is incomplete")


def _kind(cfg: dict, folder: str) -> tuple[str, str]:
    zero = cfg.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    bf16 = (cfg.get("bf16") or cfg.get("bfloat16") or {}).get("enabled", False)
    if (cfg.get("fp16") or {}).get("enabled", False):
        raise UnsupportedError(f"{folder}: fp16 DeepSpeed checkpoints are not supported")
    for key in ("offload_optimizer", "offload_param"):  # CPU offload saves the same files, from the CPU
        device = (zero.get(key) or {}).get("device", "none")
        if device not in ("none", "cpu", None):
            raise UnsupportedError(f'{folder}: saved with "zero_optimization.{key}": {{"device": "{device}"}}; '
                                   "only CPU offload checkpoints are read")
    dtype = "bf16" if bf16 else "fp32"
    accum = (cfg.get("data_types") or {}).get("grad_accum_dtype")
    return Z.optimizer_kind(stage, dtype, accum), dtype


class NativeSource:
    def __init__(self, folder: str):
        self.path = folder
        self._loaded: list[PtFile] = []  # their pages release() may drop
        self._lock = threading.Lock()  # files are loaded once, by one thread (readers may be threads)
        self.model = self._load(model_states_file(folder, 0))  # stage 0 and buffers read from it
        cfg = self.model.get("ds_config") or {}
        self.kind, self.dtype = _kind(cfg, folder)
        self.dp = int(self.model["dp_world_size"])
        if self.model.get("mp_world_size", 1) != 1:
            raise UnsupportedError(f"{folder}: model-parallel DeepSpeed checkpoints are not supported")
        self._files: dict[str, dict] = {}
        self.buffer_names = list(self.model.get("buffer_names") or [])
        self.groups = self._groups()
        zero = cfg.get("zero_optimization") or {}
        align = Z.param_alignment(2 if self.dtype == "bf16" else 4, zero.get("parameter_alignment", False))
        sub = zero.get("sub_group_size", Z.DEFAULT_SUB_GROUP_SIZE)
        self.layout = Z.plan_zero(self.groups, self.dp, self.kind, alignment=align, sub_group_size=sub)
        self.atoms = self._atoms()

    def _groups(self) -> list[list[tuple[str, int]]]:
        if self.kind == Z.PER_PARAM:
            names = [k for k in self.model["module"] if k not in self.buffer_names]
            return [[(n, self.model["module"][n].size) for n in names]]
        return [[(n, math.prod(s)) for n, s in g.items()] for g in self.model["param_shapes"]]

    def _optim(self, rank: int) -> dict:
        if self.kind == Z.PER_PARAM:
            return {"base": self.model["optimizer"], "fp32": None}
        prefix = "bf16_" if self.dtype == "bf16" else ""
        path = os.path.join(self.path, f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        return self._cached(path, self._load_optim)

    def _load_optim(self, path: str) -> dict:
        if not os.path.isfile(path):
            raise FormatError(f"{path}: missing; the native checkpoint is incomplete")
        osd = self._load(path)["optimizer_state_dict"]
        base = osd.get("base_optimizer_state", osd.get("optimizer_state_dict"))
        fp32 = osd.get("single_partition_of_fp32_groups", osd.get("fp32_flat_groups"))
        if not isinstance(base, dict) or fp32 is None:
            raise UnsupportedError(f"{path}: not a rigid ZeRO checkpoint (elastic_checkpoint?)")
        return {"base": base, "fp32": fp32, "osd": osd}

    def _cached(self, path: str, load) -> dict:
        with self._lock:
            if path not in self._files:
                self._files[path] = load(path)
            return self._files[path]

    def _load(self, path: str) -> dict:
        f = PtFile(path, CLASSES)
        self._loaded.append(f)
        return f.obj

    def _entry(self, rank: int, index: int) -> dict:
        state = self._optim(rank)["base"]["state"]
        return state.get(index, state.get(str(index), {}))

    def _param_meta(self, name: str, numel: int, shape) -> Atom:
        first = self.layout.locate(name)[0]
        entry = self._entry(first.rank, first.index)
        size = numel if self.kind == Z.PER_PARAM else self.layout.for_rank(first.rank)[first.index].numel
        states = {"fp32": "float32"}
        states.update({k: array_dtype_name(v) for k, v in _tensors(entry).items() if v.size == size})
        scalars = {k: scalar_value(v) for k, v in entry.items() if is_scalar(v)}
        return Atom(name, "param", tuple(shape), SPLIT, states, scalars)

    def _atoms(self) -> dict[str, Atom]:
        module, atoms = self.model["module"], {}
        shapes = {n: tuple(s) for g in (self.model.get("param_shapes") or []) for n, s in g.items()}
        for group in self.groups:
            for name, numel in group:
                atoms[name] = self._param_meta(name, numel, shapes.get(name, module[name].shape))
        frozen = self.model.get("frozen_param_shapes")
        if frozen is None:
            frozen = {n: t.shape for n, t in module.items() if n not in atoms and n not in self.buffer_names}
        fragments = self.model.get("frozen_param_fragments") or {}
        for name, shape in frozen.items():
            saved = fragments[name] if name in fragments else module[name]
            atoms[name] = Atom(name, "frozen", tuple(shape), SPLIT, {"param": array_dtype_name(saved)})
        for name in self.buffer_names:
            t = module[name]
            atoms[name] = Atom(name, "buffer", tuple(t.shape), SPLIT, {"param": array_dtype_name(t)})
        if self.kind == Z.PER_PARAM:
            self._check_stage0_order()
        return atoms

    def _check_stage0_order(self) -> None:
        """Stage 0 saves the torch optimizer with bare indices: assume model order, and check that every
        per-element state (whatever the optimizer calls it) has its parameter's shape."""
        names = [n for n, _ in self.groups[0]]
        base, module = self.model["optimizer"], self.model["module"]
        count = sum(len(g["params"]) for g in base["param_groups"])
        bad = [i for i, e in base["state"].items() for v in _tensors(e).values()
               if (int(i) >= len(names) or tuple(v.shape) != tuple(module[names[int(i)]].shape))]
        if count != len(names) or bad:
            raise UnsupportedError(f"{self.path}: the stage-0 optimizer does not hold the model's parameters in "
                                   "model order, so its states cannot be matched to names")

    def read(self, name: str, state: str, start: int, stop: int, dtype):
        """Elements ``[start, stop)`` of a state as a torch tensor of ``dtype`` (the loader's read;
        zeros where the files hold nothing)."""
        out = np.zeros(stop - start, numpy_dtype(self.atoms[name].states[state]))
        self.fill(out, name, state, start)
        return as_torch(out).to(dtype)

    def fill(self, out: np.ndarray, name: str, state: str, start: int = 0) -> int:
        """Copy elements ``[start, start + len(out))`` of a state into ``out``; returns how many the
        saved files held (fewer than ``len(out)`` only if a fragment is missing: the caller may then
        not rely on ``out`` being initialised)."""
        meta, stop = self.atoms[name], start + out.size
        whole = self._whole(name, state)
        if whole is not None:
            out[...] = whole.reshape(-1)[start:stop]
            return out.size
        if meta.kind == "frozen":
            numel = math.prod(meta.shape)
            ps = Z.zero3_partition_numel(numel, self.dp)
            return sum(self._copy(out, start, stop, r * ps, min(numel, (r + 1) * ps),
                                  lambda r=r: self._model_states(r)["frozen_param_fragments"][name], 0)
                       for r in range(self.dp))
        return sum(self._copy(out, start, stop, pl.fragment.param_offset,
                              pl.fragment.param_offset + pl.fragment.length,
                              lambda pl=pl: self._buffer(pl.rank, pl.index, state), pl.fragment.buffer_offset)
                   for pl in self.layout.locate(name))

    def view(self, name: str, state: str) -> np.ndarray | None:
        """The whole state as a 1-D view of the loaded (mapped) file, no copy, when one saved place
        holds all of it; None when it is split over ranks (``fill`` assembles it then)."""
        whole = self._whole(name, state)
        if whole is not None:
            return whole.reshape(-1) if whole.flags.c_contiguous else None
        places = [] if self.atoms[name].kind == "frozen" else self.layout.locate(name)
        if len(places) != 1 or places[0].fragment.length != self.atoms[name].numel:
            return None
        f = places[0].fragment
        return self._buffer(places[0].rank, places[0].index, state).reshape(-1)[f.buffer_offset:
                                                                               f.buffer_offset + f.length]

    def _whole(self, name: str, state: str) -> np.ndarray | None:
        """The saved tensor of a state that is never partitioned (buffers, ZeRO-1/2 frozen parameters,
        stage 0), else None."""
        meta = self.atoms[name]
        if meta.kind == "buffer" or (meta.kind == "frozen" and self.kind != Z.ZERO3):
            return self.model["module"][name]
        if self.kind == Z.PER_PARAM and meta.kind == "param":
            return self.model["module"][name] if state == "fp32" else self._entry(0, self._index(name))[state]
        return None

    def release(self) -> None:
        """Give back the pages of the mapped files touched so far (a streaming reader calls this every
        so many bytes, so they do not accumulate in its memory)."""
        for f in list(self._loaded):
            f.release()

    def _model_states(self, rank: int) -> dict:
        return self._cached(model_states_file(self.path, rank), self._load)

    def _index(self, name: str) -> int:
        return [n for n, _ in self.groups[0]].index(name)

    def _buffer(self, rank: int, index: int, state: str) -> np.ndarray:
        files = self._optim(rank)
        return files["fp32"][index] if state == "fp32" else self._entry(rank, index)[state]

    @staticmethod
    def _copy(out, start, stop, lo, hi, fetch, base) -> int:
        """Copy source elements [lo, hi) of the atom (at ``base`` in ``fetch()``) that fall in [start, stop);
        returns how many."""
        a, b = max(lo, start), min(hi, stop)
        if a < b:
            out[a - start:b - start] = fetch().reshape(-1)[base + a - lo:base + b - lo]
        return max(b - a, 0)

    def common_state(self) -> dict:
        files = self._optim(0)
        return as_torch(common_state(self.model, files["base"]["param_groups"], files.get("osd", {})))

    def rank_state(self, rank: int, world_size: int) -> None:
        return None  # DeepSpeed does not save RNG states

    def bytes(self) -> None:
        return None  # files are mapped whole


def common_state(model: dict, param_groups: list, osd: dict) -> dict:
    """The ``state.py`` schema from a DeepSpeed model-states dict, the base optimizer's param groups and
    the ZeRO wrapper's state dict (loss scaler, clipping); shared with ``universal``."""
    scaler = osd.get("loss_scaler")
    return {"engine": {k: model.get(k) for k in ("global_steps", "global_samples", "skipped_steps")},
            "lr_scheduler": model.get("lr_scheduler"),
            "optimizer": {"param_groups": [{k: v for k, v in g.items() if k != "params"} for g in param_groups],
                          "wrapper": {k: osd[k] for k in ("dynamic_loss_scale", "overflow", "clip_grad") if k in osd},
                          "loss_scaler": None if scaler is None else
                          {"class": type(scaler).__name__, "fields": dict(vars(scaler))}},
            "client_state": {k: v for k, v in model.items() if k not in DS_KEYS}}
