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
from . import ds_universal, native


class UcpSource:
    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.path = checkpoint.path
        self.atoms = {a.name: a for a in checkpoint.manifest.atoms}
        self.dp, self.tp = checkpoint.manifest.layout.dp, checkpoint.manifest.layout.tp
        self.requested = 0

    def read(self, name: str, state: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        meta = self.atoms[name]
        out = self.checkpoint.read_fragment(name, state, Region.whole(meta.shape), start, stop, dtype)
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
        if self.checkpoint.manifest.state_ranks != world_size or not self.checkpoint.has_state(rank):
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


# Foreign checkpoint readers, tried in order after ``ucp.json``: name -> (probe(folder), open(folder)).
# A DeepSpeed universal folder also has model-states files, so it is probed before a native one.
FOREIGN_SOURCES: dict[str, tuple] = {}


def register_source(name: str, probe, opener) -> None:
    """Register a reader of another checkpoint kind; a second registration under a name is refused."""
    if name in FOREIGN_SOURCES and FOREIGN_SOURCES[name] != (probe, opener):
        raise ValueError(f"a checkpoint source named {name!r} is already registered")
    FOREIGN_SOURCES[name] = (probe, opener)


def open_source(load_dir: str, tag=None, verify: bool = True):
    """A universal checkpoint if the folder has ``ucp.json``, else the first registered foreign source
    that recognises it (a ``ds_to_universal`` folder, a native DeepSpeed checkpoint)."""
    folder = checkpoint_folder(load_dir, tag)
    if os.path.isfile(os.path.join(folder, MANIFEST)):
        return UcpSource(Checkpoint.open(folder, verify=verify))
    for probe, opener in FOREIGN_SOURCES.values():
        if probe(folder):
            return opener(folder)
    resolve(folder)  # raises the precise reason (missing, interrupted save, empty, ...)
    raise FormatError(f"{folder}: neither a universal checkpoint ({MANIFEST}), nor a DeepSpeed universal "
                      "folder (zero/optimizer_state.pt), nor a DeepSpeed one (*_model_states.pt)")


register_source("deepspeed.universal", ds_universal.is_ds_universal, ds_universal.DsUniversalSource)
register_source("deepspeed.native", native.is_native, native.NativeSource)
