"""Every collective the plugin uses, behind one small wrapper.

``Comm.run(fn)`` runs ``fn`` on every rank and then agrees on the outcome: if any rank raised, every
rank raises a ``DistributedError`` naming that rank and its message, so one rank's bad file never
leaves the others hanging in a later collective. Works without an initialised process group
(world size 1).
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch

from .errors import UCPError

T = TypeVar("T")
_MAX_MSG = 4096


class DistributedError(UCPError):
    """Raised on every rank when some rank failed; the message carries that rank's error."""


class Comm:
    def __init__(self, group=None):
        import torch.distributed as dist

        self._dist = dist if dist.is_available() and dist.is_initialized() else None
        self.group = group
        self.rank = self._dist.get_rank(group) if self._dist else 0
        self.world_size = self._dist.get_world_size(group) if self._dist else 1

    def barrier(self) -> None:
        if self._dist:
            self._dist.barrier(group=self.group)

    def broadcast_str(self, text: str, src: int = 0) -> str:
        if not self._dist:
            return text
        data = torch.zeros(_MAX_MSG, dtype=torch.uint8)
        if self.rank == src:
            raw = text.encode()[:_MAX_MSG]
            data[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        self._dist.broadcast(data, src=self._global(src), group=self.group)
        return bytes(data.tolist()).rstrip(b"\0").decode()

    def _global(self, rank: int) -> int:
        return self._dist.get_global_rank(self.group, rank) if self.group is not None else rank

    def first_error(self, message: str | None) -> tuple[int, str] | None:
        """All ranks learn the lowest rank that reported an error, and its message."""
        if not self._dist:
            return (0, message) if message is not None else None
        flag = torch.tensor([self.rank if message is not None else self.world_size], dtype=torch.int64)
        self._dist.all_reduce(flag, op=self._dist.ReduceOp.MIN, group=self.group)
        bad = int(flag.item())
        if bad == self.world_size:
            return None
        return bad, self.broadcast_str(message or "", src=bad)

    def run(self, fn: Callable[[], T]) -> T:
        result, message, error = None, None, None
        try:
            result = fn()
        except Exception as e:  # re-raised below on every rank, with this rank's original as cause
            error, message = e, f"{type(e).__name__}: {e}"
        failed = self.first_error(message)
        if failed is not None:
            bad, text = failed
            if bad == self.rank:
                raise error
            raise DistributedError(f"rank {bad}: {text}") from error
        return result

    def all_sum(self, value: int) -> int:
        if not self._dist:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        self._dist.all_reduce(t, group=self.group)
        return int(t.item())
