"""Every collective the plugin uses, behind one small wrapper.

``Comm.run(fn)`` runs ``fn`` on every rank and then agrees on the outcome: if any rank raised, every
rank raises a ``DistributedError`` naming that rank and its message, so one rank's bad file never
leaves the others hanging in a later collective. Works without an initialised process group
(world size 1).

Any backend. The plugin's collectives carry tiny control messages (an error flag, a rank's error
text, a count, a folder name) as CPU tensors. When the group's backend cannot take CPU tensors (an
NCCL default group, as DeepSpeed and Megatron-LM create on GPUs: "No backend type associated with
device type cpu"), they travel on a gloo side group over the same ranks instead, created once per
process (``dist.new_group``, collectively: ``Comm()`` is built on every rank at each save and load
entry point, which are collective anyway) and cached. Chosen over moving the messages to the
current accelerator because (1) it needs no knowledge of which device a rank drives (a job that
never called ``torch.cuda.set_device`` would put every rank's messages on cuda:0 and NCCL hangs or
errors), (2) it adds no device synchronisation or memory traffic to the training stream, and (3) the
error agreement still works when the failure is a CUDA error that poisons the device stream. The
cost is one gloo communicator (a few TCP connections per rank) for the life of the process.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch

from .errors import UCPError

T = TypeVar("T")
_MAX_MSG = 4096
_SIDE_GROUPS: dict[tuple[int, ...], tuple[object, object]] = {}  # ranks -> (default group, gloo group)


class DistributedError(UCPError):
    """Raised on every rank when some rank failed; the message carries that rank's error."""


def takes_cpu(group) -> bool:
    """Whether ``group``'s backend runs collectives on CPU tensors (gloo, mpi, a "cpu:gloo,cuda:nccl"
    pair), read from the devices its backends are registered for, as torch's object collectives do.
    None means the default group."""
    import torch.distributed as dist

    devices = (group or dist.distributed_c10d._get_default_group())._device_types
    return not devices or torch.device("cpu") in devices  # none registered yet: gloo is created lazily


def side_group(group):
    """The gloo group over ``group``'s ranks the plugin's CPU tensors travel on, created at the first
    call (on every rank of ``group``, in the same order) and reused until the default group changes."""
    import torch.distributed as dist

    default = dist.distributed_c10d._get_default_group()
    ranks = tuple(dist.get_process_group_ranks(group or default))
    cached = _SIDE_GROUPS.get(ranks)
    if cached is None or cached[0] is not default:
        # the world: every rank creates it (torch's group counter advances alike on all ranks); a
        # subgroup: only its members, so its name is hashed from its ranks instead
        local = group is not None and len(ranks) < dist.get_world_size()
        side = dist.new_group(list(ranks), backend="gloo", use_local_synchronization=local, sort_ranks=False)
        cached = _SIDE_GROUPS[ranks] = (default, side)
    return cached[1]


class Comm:
    def __init__(self, group=None):
        import torch.distributed as dist

        self._dist = dist if dist.is_available() and dist.is_initialized() else None
        self.group = group
        self.rank = self._dist.get_rank(group) if self._dist else 0
        self.world_size = self._dist.get_world_size(group) if self._dist else 1
        # the group the CPU tensors below travel on: ``group`` itself, or its gloo side group
        self.wire = None
        if self._dist and not takes_cpu(group):
            self.wire = side_group(group)
        elif self._dist:
            self.wire = group

    def barrier(self) -> None:
        if self._dist:
            self._dist.barrier(group=self.wire)

    def broadcast_str(self, text: str, src: int = 0) -> str:
        if not self._dist:
            return text
        data = torch.zeros(_MAX_MSG, dtype=torch.uint8)
        if self.rank == src:
            raw = text.encode()[:_MAX_MSG]
            data[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        self._dist.broadcast(data, src=self._global(src), group=self.wire)
        return bytes(data.tolist()).rstrip(b"\0").decode()

    def _global(self, rank: int) -> int:
        return self._dist.get_global_rank(self.group, rank) if self.group is not None else rank

    def first_error(self, message: str | None) -> tuple[int, str] | None:
        """All ranks learn the lowest rank that reported an error, and its message."""
        if not self._dist:
            return (0, message) if message is not None else None
        flag = torch.tensor([self.rank if message is not None else self.world_size], dtype=torch.int64)
        self._dist.all_reduce(flag, op=self._dist.ReduceOp.MIN, group=self.wire)
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
        self._dist.all_reduce(t, group=self.wire)
        return int(t.item())
