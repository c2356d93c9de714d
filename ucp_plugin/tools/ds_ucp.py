"""``ucp convert CKPT OUT --to deepspeed``: a universal checkpoint of a plain DeepSpeed model written as
DeepSpeed's own universal folder, which stock DeepSpeed (without this plugin) resumes with
``"checkpoint": {"load_universal": true}``.

The folder is what ``ds_to_universal`` writes, readable by both of DeepSpeed's universal loaders
(ZeRO-1/2 and ZeRO-3, any DP size)::

    OUT/latest_universal                  the tag (written last: the folder's commit marker)
    OUT/<tag>/mp_rank_00_model_states.pt  engine counters, LR scheduler, client state (ZeRO-1/2 name)
    OUT/<tag>/zero_pp_rank_0_mp_rank_00_model_states.pt   the same file under ZeRO-3's name
    OUT/<tag>/zero/optimizer_state.pt     param groups, clipping, and the ``step`` ZeRO-3 reads
    OUT/<tag>/zero/<param>/{fp32,exp_avg,...}.pt   {"param": full tensor, "cat_dim": 0}; step.pt

These are DeepSpeed's pickled ``.pt`` files (its format; ours stays pickle-free), holding tensors,
numbers, strings and dicts only. One atom is read and written at a time. Stock DeepSpeed's universal
loading restores neither frozen parameters nor buffers (it never loads the module state dict); they
are written (``zero/<name>/fp32.pt`` and the model-states ``module``) for other readers.
"""
from __future__ import annotations

import os
import shutil
from collections import OrderedDict

import torch

from ..errors import FormatError, UnsupportedError
from ..storage import Checkpoint
from ..storage.files import atomic_write_text, fsync_path

ENGINE_KEYS = ("global_steps", "global_samples", "skipped_steps")
# DeepSpeed checks the writer's version (ZeRO-1 refuses < 0.3.17); used when the manifest lacks it
DEFAULT_DS_VERSION = "0.16.0"


def _check_plain(ck: Checkpoint) -> None:
    m = ck.manifest
    split = [a.name for a in m.atoms if a.split.get("kind") != "replicated"]
    if m.layout.tp > 1 or m.layout.pp > 1 or split:
        raise UnsupportedError(f"{ck.path}: --to deepspeed writes DeepSpeed's universal folder for plain DeepSpeed "
                               f"models; this checkpoint ({m.family or 'model-parallel'}, {m.layout.describe()}) "
                               "has tensor-parallel splits: load it with the plugin instead")
    if not ck.has_state():
        raise FormatError(f"{ck.path}: no state/common.json (a weights-only checkpoint); stock DeepSpeed needs the "
                          "training state to resume")


def _write_atom(ck: Checkpoint, zero: str, atom) -> None:
    folder = os.path.join(zero, atom.name)
    os.makedirs(folder, exist_ok=True)
    weight = "fp32" if atom.kind == "param" else "param"
    for state in atom.states:
        t = ck.read_atom(atom.name, state).contiguous()
        torch.save({"param": t, "cat_dim": 0}, os.path.join(folder, f"{'fp32' if state == weight else state}.pt"))
    if "step" in atom.scalars:  # torch's Adam/AdamW keep a float32 tensor step
        torch.save(torch.tensor(float(atom.scalars["step"])), os.path.join(folder, "step.pt"))


def _optimizer_state(common: dict, atoms, version: str) -> dict:
    opt = common.get("optimizer") or {}
    groups = [dict(g, params=[i]) for i, g in enumerate(opt.get("param_groups") or [])]
    steps = [a.scalars["step"] for a in atoms if a.kind == "param" and "step" in a.scalars]
    step = torch.tensor(float(max(steps) if steps else 0))
    return {**(opt.get("wrapper") or {}), "ds_version": version, "param_groups": groups,
            # ZeRO-3's loader reads one step and the first group's hyperparameters from here
            "optimizer_state_dict": {"state": {0: {"step": step}}, "param_groups": groups}}


def _model_states(ck: Checkpoint, common: dict, version: str) -> dict:
    m = ck.manifest
    engine = common.get("engine") or {}
    params = OrderedDict((a.name, torch.Size(a.shape)) for a in m.atoms if a.kind == "param")
    module = OrderedDict((a.name, ck.read_atom(a.name, "param")) for a in m.atoms if a.kind != "param")
    return {**(common.get("client_state") or {}), "module": module,
            "buffer_names": [a.name for a in m.atoms if a.kind == "buffer"], "param_shapes": [params],
            "frozen_param_shapes": OrderedDict((a.name, torch.Size(a.shape)) for a in m.atoms if a.kind == "frozen"),
            "shared_params": {}, "frozen_param_fragments": {}, "lr_scheduler": common.get("lr_scheduler"),
            "data_sampler": None, "random_ltd": None, **{k: engine.get(k, 0) for k in ENGINE_KEYS},
            "dp_world_size": m.layout.dp, "mp_world_size": 1, "ds_version": version,
            "checkpoint_parallel_dimensions": {"pp_degree": 1, "tp_degree": 1}}


def to_deepspeed(path: str, out: str, progress: bool = False) -> str:
    """Write ``out/<tag>`` + ``out/latest_universal``; the tag is the checkpoint folder's name."""
    ck = Checkpoint.open(path)
    _check_plain(ck)
    tag = os.path.basename(os.path.normpath(ck.path))
    final, staging = os.path.join(out, tag), os.path.join(out, f".{tag}.partial")
    if os.path.exists(final):
        raise FormatError(f"{final}: exists; choose another output folder")
    shutil.rmtree(staging, ignore_errors=True)  # a previous, interrupted conversion
    zero = os.path.join(staging, "zero")
    os.makedirs(zero)
    common = ck.load_state()
    version = ck.manifest.writer.framework_version or DEFAULT_DS_VERSION
    from tqdm import tqdm
    for atom in tqdm(ck.manifest.atoms, desc="atoms", unit="atom", disable=not progress):
        _write_atom(ck, zero, atom)
    torch.save(_optimizer_state(common, ck.manifest.atoms, version), os.path.join(zero, "optimizer_state.pt"))
    states = _model_states(ck, common, version)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        torch.save(states, os.path.join(staging, name))
    os.replace(staging, final)
    fsync_path(out)
    atomic_write_text(os.path.join(out, "latest_universal"), tag)
    return final
