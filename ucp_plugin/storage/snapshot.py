"""A rank's save state copied into host memory, to be written later (asynchronous save).

``Snapshot`` stands in for a ``ShardWriter`` while the adapter's ``fill`` runs: it records the calls
(``add_atom``, ``add``, ``save_state``) and keeps a reference to each tensor instead of writing it.
``copy_into(arena)`` then copies every recorded tensor into one ``StagingArena`` (device-to-host for
GPU tensors), after which the training may change its tensors freely; ``replay(writer)`` makes the
same calls on a real ``ShardWriter`` from those copies, in the recorded order, on any thread; the
writer holds the arena's views as they are (``ShardWriter.add`` copies only GPU or non-contiguous
tensors), so the state is copied into host memory once per save.

The arena is one flat byte buffer, pinned when CUDA is available (so device-to-host copies are
DMA without a bounce buffer), sized to one rank's state and reused: after the first save of a
model no save allocates host memory for tensors again (it grows only if the state grows). State
trees (RNG, scheduler, client state) are small and are copied as they are.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..format import Atom, Region
from ..plan import IDENTITY

ALIGN = 64  # every slot starts on a cache line, so a byte slice can be viewed as any dtype


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class StagingArena:
    """One reusable host buffer; ``slots`` views it as consecutive tensors."""

    def __init__(self, pin: bool | None = None):
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self.allocations = 0  # how many times the buffer was (re)allocated: tests check reuse

    def slots(self, specs: list[tuple[torch.dtype, torch.Size]]) -> list[torch.Tensor]:
        """Views of the buffer, one per (dtype, shape), growing the buffer only if it is too small."""
        sizes = [_aligned(shape.numel() * dtype.itemsize) for dtype, shape in specs]
        total = sum(sizes)
        if total > self.buffer.numel():
            self.buffer = torch.empty(total, dtype=torch.uint8, pin_memory=self.pin)
            self.allocations += 1
        out, offset = [], 0
        for (dtype, shape), size in zip(specs, sizes):
            nbytes = shape.numel() * dtype.itemsize
            out.append(self.buffer[offset:offset + nbytes].view(dtype).view(shape))
            offset += size
        return out


@dataclass(frozen=True)
class _Add:
    atom: str
    state: str
    region: Region
    start: int
    replica: int
    order: str


def _own(obj):
    """A copy of a state tree that shares no tensor with the training."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _own(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(_own(v) for v in obj)
    return copy.deepcopy(obj)


class Snapshot:
    """Records a ``fill``'s writer calls; see the module docstring. Same call signatures as
    ``ShardWriter`` (``add_atom``, ``add``, ``save_state``)."""

    def __init__(self, rank: int):
        self.rank = rank
        self._calls: list[tuple[str, object]] = []
        self._sources: list[torch.Tensor] = []  # the training's tensors, until copy_into
        self._copies: list[torch.Tensor] = []

    def add_atom(self, info: Atom) -> None:
        self._calls.append(("atom", info))

    def add(self, atom: str, state: str, data: torch.Tensor, region: Region, start: int,
            replica: int = 0, order: str = IDENTITY) -> None:
        self._calls.append(("add", (_Add(atom, state, region, start, replica, order), len(self._sources))))
        self._sources.append(data.detach())

    def save_state(self, obj, common: bool = False) -> None:
        self._calls.append(("state", (_own(obj), common)))

    def copy_into(self, arena: StagingArena) -> None:
        """Copy every recorded tensor into ``arena`` and drop the references to the training's
        tensors. Returns once the copies are complete (device work included)."""
        self._copies = arena.slots([(t.dtype, t.shape) for t in self._sources])
        on_device = False
        for dst, src in zip(self._copies, self._sources):
            on_device |= src.device.type != "cpu"
            dst.copy_(src, non_blocking=arena.pin and src.device.type == "cuda")
        if on_device and torch.cuda.is_available():
            torch.cuda.synchronize()  # the training may overwrite its tensors once we return
        self._sources = []

    def replay(self, writer) -> None:
        """Make the recorded calls on ``writer`` (a ``ShardWriter``), from the arena's copies."""
        if self._sources:
            raise RuntimeError("Snapshot.replay before copy_into: the data is still the training's")
        for kind, payload in self._calls:
            if kind == "atom":
                writer.add_atom(payload)
            elif kind == "add":
                a, i = payload
                writer.add(a.atom, a.state, self._copies[i], a.region, a.start, a.replica, a.order)
            else:
                obj, common = payload
                writer.save_state(obj, common=common)
