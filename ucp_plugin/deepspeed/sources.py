"""What ``load.py`` reads from: a universal checkpoint or a native DeepSpeed one, behind one interface.

A *source* offers ``path``, ``atoms`` (name -> ``format.Atom``, pieces left out), ``read(name, state, start, stop, dtype)``
(flat elements of one atom state), ``common_state()`` (the ``state.py`` schema),
``rank_state(rank, world_size)`` (RNG, or None when it cannot apply) and ``bytes()`` (bytes requested
by ``read`` calls at their stored size, bytes fetched from storage; None where not counted).
"""
from __future__ import annotations

import os
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

    reads_in_place = True  # ``read(..., out=)`` fills the caller's tensor without a temporary

    def read(self, name: str, state: str, start: int, stop: int, dtype: torch.dtype,
             out: torch.Tensor | None = None) -> torch.Tensor:
        meta = self.atoms[name]
        out = self.checkpoint.read_fragment(name, state, Region.whole(meta.shape), start, stop, dtype, out=out)
        self.note_request(name, state, stop - start)
        return out

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


def open_source(load_dir: str, tag=None, verify: bool = True):
    """A universal checkpoint if the folder has ``ucp.json``, else a native DeepSpeed checkpoint."""
    from . import native

    folder = checkpoint_folder(load_dir, tag)
    if os.path.isfile(os.path.join(folder, MANIFEST)):
        return UcpSource(Checkpoint.open(folder, verify=verify))
    if native.is_native(folder):
        return native.NativeSource(folder)
    resolve(folder)  # raises the precise reason (missing, interrupted save, empty, ...)
    raise FormatError(f"{folder}: neither a universal checkpoint ({MANIFEST}) nor a DeepSpeed one "
                      "(*_model_states.pt)")
