"""What ``load.py`` reads from: a universal checkpoint or a native DeepSpeed one, behind one interface.

A *source* offers ``path``, ``atoms`` (name -> ``format.Atom``, pieces left out), ``read(name, state, start, stop, dtype)``
(flat elements of one atom state; the universal source also ``read_batch(items, outs)``: a whole
load planned, then executed, at once), ``common_state()`` (the ``state.py`` schema),
``rank_state(rank, world_size)`` (RNG, or None when it cannot apply) and ``bytes()`` (bytes requested
by ``read`` calls at their stored size, bytes fetched from storage; None where not counted).
Kinds of folder are registered (``register_source``): the universal format, DeepSpeed's own universal
folders (``ds_to_universal``) and native DeepSpeed.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import FormatError
from ..format import MANIFEST, Region
from ..storage import Checkpoint, read_latest, resolve


class UcpSource:
    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.path = checkpoint.path
        self.atoms = {a.name: a for a in checkpoint.top.atoms}
        self.dp, self.tp = checkpoint.top.layout.dp, checkpoint.top.layout.tp
        self.requested = 0
        self.phases: dict | None = None

    reads_in_place = True  # ``read(..., out=)`` fills the caller's tensor without a temporary

    def read(self, name: str, state: str, start: int, stop: int, dtype: torch.dtype,
             out: torch.Tensor | None = None) -> torch.Tensor:
        meta = self.atoms[name]
        out = self.checkpoint.read_fragment(name, state, Region.whole(meta.shape), start, stop, dtype, out=out)
        self.note_request(name, state, stop - start)
        return out

    def read_batch(self, items, outs) -> None:
        """Every ``ReadItem`` of ``items`` into its ``outs`` entry: planned together, then executed
        as one pool of fetches (``Checkpoint.plan_batch`` / ``execute_batch``). ``phases`` keeps the
        seconds of the last batch (plan, execute; read/verify/copy summed over threads)."""
        clock, start = self.checkpoint.clock, time.perf_counter()
        before = dict(clock.seconds)
        plan = self.checkpoint.plan_batch(items)
        planned = time.perf_counter()
        self.checkpoint.execute_batch(plan, outs)
        self.phases = {"plan": planned - start, "execute": time.perf_counter() - planned,
                       **{k: v - before[k] for k, v in clock.seconds.items()}}
        for item in items:
            self.note_request(item.atom, item.state, item.numel)

    def note_request(self, name: str, state: str, elements: int) -> None:
        """Count ``elements`` of ``name``'s ``state`` as needed (at their stored size); for readers
        that go to ``checkpoint`` directly (a parameter map reading TP regions)."""
        self.requested += elements * getattr(torch, self.atoms[name].states[state]).itemsize

    def bytes(self) -> tuple[int, int]:
        return self.requested, self.checkpoint.bytes_read

    def common_state(self) -> dict:
        if not self.checkpoint.has_state():
            raise FormatError(f"{self.path}: no state/common.json; it was not written by a training "
                              "adapter (a converted or exported checkpoint?): load with "
                              "load_optimizer_states=False, load_lr_scheduler_states=False")
        return self.checkpoint.load_state()

    def rank_state(self, rank: int, world_size: int) -> dict | None:
        if self.checkpoint.top.state_ranks != world_size or not self.checkpoint.has_state(rank):
            return None
        return self.checkpoint.load_state(rank)


def has_latest(load_dir) -> bool:
    """True if ``load_dir`` names a checkpoint without a tag: it has ``latest`` or is a checkpoint."""
    d = str(load_dir)
    return os.path.isdir(d) and (read_latest(d) is not None or os.path.isfile(os.path.join(d, MANIFEST)))


def checkpoint_folder(load_dir: str, tag) -> str:
    if tag is not None:
        return os.path.join(str(load_dir), str(tag))
    latest = read_latest(str(load_dir)) if os.path.isdir(str(load_dir)) else None
    return os.path.join(str(load_dir), latest) if latest else str(load_dir)


@dataclass(frozen=True)
class SourceKind:
    """A kind of checkpoint folder ``load_checkpoint`` reads: ``claims(folder)`` says whether a folder
    is one, ``open(folder, verify)`` returns its source; ``description`` names it in errors."""
    name: str
    claims: Callable[[str], bool]
    open: Callable[[str, bool], object]
    description: str


_SOURCES: dict[str, SourceKind] = {}


def register_source(kind: SourceKind) -> None:
    """Add a checkpoint source; ``open_source`` asks each in registration order. A second kind under
    the same name raises."""
    if kind.name in _SOURCES:
        raise ValueError(f"a checkpoint source named {kind.name!r} is already registered")
    _SOURCES[kind.name] = kind


def _native(folder: str, verify: bool):
    from ..dsfiles.native import NativeSource

    return NativeSource(folder)


def _is_native(folder: str) -> bool:
    from ..dsfiles.native import is_native

    return is_native(folder)


register_source(SourceKind("ucp", lambda folder: os.path.isfile(os.path.join(folder, MANIFEST)),
                           lambda folder, verify: UcpSource(Checkpoint.open(folder, verify=verify)),
                           f"a universal checkpoint ({MANIFEST})"))
def _ds_universal(folder: str, verify: bool):
    from ..dsfiles.universal import DsUniversalSource

    return DsUniversalSource(folder)


def _is_ds_universal(folder: str) -> bool:
    from ..dsfiles.universal import is_ds_universal

    return is_ds_universal(folder)


# before native: a ds_to_universal folder also holds model-states files
register_source(SourceKind("deepspeed.universal", _is_ds_universal, _ds_universal,
                           "a DeepSpeed universal folder (zero/optimizer_state.pt)"))
register_source(SourceKind("deepspeed.native", _is_native, _native, "a DeepSpeed one (*_model_states.pt)"))


def open_source(load_dir: str, tag=None, verify: bool = True):
    """The source of the first registered kind that claims the folder (a universal checkpoint if it
    has ``ucp.json``, else a native DeepSpeed checkpoint)."""
    folder = checkpoint_folder(load_dir, tag)
    for kind in _SOURCES.values():
        if kind.claims(folder):
            return kind.open(folder, verify)
    resolve(folder)  # raises the precise reason (missing, interrupted save, empty, ...)
    raise FormatError(f"{folder}: neither " + " nor ".join(k.description for k in _SOURCES.values()))
