"""``ucp export CKPT OUT --to hf``: a folder ``transformers.AutoModelForCausalLM.from_pretrained(OUT)``
loads -- ``config.json`` and ``model.safetensors`` (or ``model-0000K-of-0000N.safetensors`` shards and
``model.safetensors.index.json`` past ``max_shard_size``).

Checkpoints of megatron-core models are mapped by their family's ``hf_spec`` (``ucp_plugin.models``,
``language.hf``). Checkpoints of HF models trained under DeepSpeed already carry HF names: they are
written as they are, with the ``config.json`` the Trainer saved beside the checkpoint (or one given).

Streaming: HF tensors are written in order, each as the segments of its atoms; one atom is read at a
time (a fused QKV is read once for q, k and v), so memory stays at about the largest atom plus one
segment of it, whatever the model's size.
"""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass

import torch

from ..errors import FormatError, UnsupportedError
from ..language.hf import HfTensor, Segment
from ..storage import Checkpoint
from ..storage.files import atomic_write_text
from ..storage.stream import StreamWriter

FAMILIES = ("gpt", "llama", "mixtral")
DEFAULT_SHARD = 5 * 2**30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class HfPlan:
    config: dict
    tensors: tuple[HfTensor, ...]


def family_hf(family: str, model: dict, where: str):
    """(HfSpec, ModelConfig) of a checkpoint's family, from the manifest's ``model.config``."""
    from ..models import ModelConfig
    from ..models._hf import values
    if family not in FAMILIES:
        raise UnsupportedError(f"{where}: model family {family!r} has no Hugging Face mapping; known: {FAMILIES}")
    if "config" not in model:
        raise FormatError(f"{where}: the manifest records no model config (model.config); re-save with a "
                          "current ucp_plugin")
    cfg = ModelConfig(**model["config"])
    spec = importlib.import_module(f"ucp_plugin.models.{family}").hf_spec(cfg)
    return spec, cfg, values(cfg)


def _recorded_config(path: str, config: str | None) -> dict | None:
    """config.json given, or saved by HF's Trainer in the folder holding the checkpoint."""
    candidates = [config] if config else [os.path.join(os.path.dirname(os.path.normpath(path)), "config.json")]
    for c in candidates:
        if c and os.path.isfile(c):
            with open(c) as f:
                return json.load(f)
    if config:
        raise FormatError(f"{config}: no such config.json")
    return None


def plan(ck: Checkpoint, config: str | None = None) -> HfPlan:
    m = ck.manifest
    if m.family is not None:
        spec, _, vals = family_hf(m.family, m.model, ck.path)
        return HfPlan(spec.hf_config(vals), tuple(spec.plan({a.name: a.shape for a in m.atoms})))
    recorded = _recorded_config(ck.path, config)
    if recorded is None:
        raise UnsupportedError(f"{ck.path}: the model family is unknown (the manifest records none) and no "
                               "config.json lies beside it; pass the HF model's config (--config) to export "
                               "a checkpoint whose names are already Hugging Face names")
    return HfPlan(recorded, tuple(HfTensor(a.name, a.shape, (Segment(a.name, None, False),)) for a in m.atoms))


def shards(tensors: tuple[HfTensor, ...], itemsize: int, max_bytes: int) -> list[list[HfTensor]]:
    """Consecutive tensors grouped into files of at most ``max_bytes`` (a larger tensor alone)."""
    out, size = [[]], 0
    for t in tensors:
        n = itemsize
        for s in t.shape:
            n *= s
        if out[-1] and size + n > max_bytes:
            out.append([])
            size = 0
        out[-1].append(t)
        size += n
    return out


class _AtomCache:
    """The last atom read (consecutive HF tensors often cut the same atom)."""

    def __init__(self, ck: Checkpoint):
        self.ck, self.name, self.tensor = ck, None, None

    def get(self, name: str) -> torch.Tensor:
        if name != self.name:
            atom = self.ck.manifest.atom(name)
            self.name, self.tensor = name, self.ck.read_atom(name, "fp32" if atom.kind == "param" else "param")
        return self.tensor


def segment_tensor(atom: torch.Tensor, seg: Segment) -> torch.Tensor:
    t = atom if seg.ranges is None else torch.cat([atom[a:b] for a, b in seg.ranges])
    return t.t() if seg.transpose else t


def export_hf(path: str, out: str, dtype: str = "float32", max_shard_size: int = DEFAULT_SHARD,
              config: str | None = None, progress: bool = False) -> str:
    from tqdm import tqdm

    ck, target = Checkpoint.open(path), DTYPES[dtype]
    p = plan(ck, config)
    os.makedirs(out, exist_ok=True)
    groups = shards(p.tensors, target.itemsize, max_shard_size)
    names = ["model.safetensors"] if len(groups) == 1 else \
        [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    cache, weight_map, total = _AtomCache(ck), {}, sum(_nbytes(t, target) for t in p.tensors)
    with tqdm(total=total, unit="B", unit_scale=True, desc="export", disable=not progress) as bar:
        for name, group in zip(names, groups):
            decl = [(t.name, _dtype(ck, t, target), t.shape) for t in group]
            with StreamWriter(os.path.join(out, name), decl) as w:
                for t, (_, dt, _) in zip(group, decl):
                    for seg in t.segments:
                        bar.update(w.write(segment_tensor(cache.get(seg.atom), seg).to(dt).contiguous()))
                    weight_map[t.name] = name
    if len(groups) > 1:
        atomic_write_text(os.path.join(out, "model.safetensors.index.json"), json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config_out = {**p.config, "dtype": dtype}
    atomic_write_text(os.path.join(out, "config.json"), json.dumps(config_out, indent=1))
    return out


def _dtype(ck: Checkpoint, t: HfTensor, target: torch.dtype) -> torch.dtype:
    """Floating tensors in ``target``; integer buffers keep their dtype."""
    atom = ck.manifest.atom(t.segments[0].atom)
    stored = getattr(torch, next(iter(atom.states.values())))
    return target if stored.is_floating_point else stored


def _nbytes(t: HfTensor, dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in t.shape:
        n *= s
    return n
