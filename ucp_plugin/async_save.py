"""Asynchronous save: the training waits for the snapshot into host memory, not for the disk.

``session.save_universal(..., asynchronous=True)`` snapshots this rank's state into a reusable
host buffer (``storage.snapshot``) in the training thread and hands the rest — serialization,
hashing, writing, fsync, i.e. ``ShardWriter`` — to a background thread, then returns. At most one
save per process is in flight.

**A thread, not a process.** Everything the writer does releases the GIL for the bulk of its time:
file writes and fsync are system calls, ``hashlib`` releases it while hashing buffers over 2 KiB,
and torch's tensor copies run in C++ without it. So the training thread keeps running Python while
the writer works, without the cost of a process: no second copy of the state through shared memory
or a pipe, no fork of a process that holds CUDA and a process group, no second interpreter importing
torch. What the writer does compete for is CPU cores and memory bandwidth (benchmarks/async_save.py);
so it runs at nice ``WRITER_NICE`` (Linux sets the nice value per thread): where the cores are all
busy training, the scheduler gives the training thread the larger share and the writer the rest —
the save only has to be done by the next one. Where that is not permitted it runs at the process's.

**Commit, all-or-nothing, without collectives off the training thread.** The background thread
touches only files: it never calls ``Comm`` (the training's process group is not thread-safe to
share with a running training). Completion is agreed in the training thread at a *safe point*:
- ``poll()`` (cheap, non-blocking; call it at step boundaries): one all-reduce of "my write is
  done"; when every rank is done, the save is finalized there and then;
- the next save (``on_busy="wait"`` finalizes the previous one first, ``"refuse"`` raises
  ``SaveInProgressError`` if it is still being written), and every load;
- ``wait()``: blocks until this process's in-flight save is committed on every rank — the way for
  a user to be sure, e.g. before exiting or before ``destroy_process_group``.
Finalizing agrees on every rank's background outcome (``Comm.run``: one rank's write error is raised
on every rank and nothing is committed) and then rank 0 commits (manifest, rename, ``latest``), as a
synchronous save does. ``poll``, ``wait`` and the saves are collective: every rank calls them at the
same points, as it calls ``save_checkpoint``.

**Exit.** The writer thread is not a daemon, so the interpreter lets it finish; an ``atexit`` hook
then finalizes the save if the process group is still up. If it is not (or a rank died), nothing is
committed and ``latest`` stays on the previous checkpoint: the staging protocol never leaves a torn
one, and the next save sweeps the leftover staging folder (``storage.stale``).
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from typing import Callable

from .comm import Comm
from .errors import UCPError
from .storage.snapshot import StagingArena

log = logging.getLogger(__name__)
WAIT, REFUSE = "wait", "refuse"
ON_BUSY = (WAIT, REFUSE)
WRITER_NICE = 10  # the writer thread's nice value (never below the process's own)


class SaveInProgressError(UCPError):
    """A save was requested while the previous asynchronous save is still being written."""


class PendingSave:
    """One asynchronous save: the background write of this rank, then the commit at a safe point."""

    def __init__(self, comm: Comm, label: str, write: Callable[[], None], commit: Callable[[], object]):
        self.comm, self.label, self._write, self.commit = comm, label, write, commit
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"ucp-save-{label}", daemon=False)

    def _run(self) -> None:
        _lower_priority(WRITER_NICE)
        try:
            self._write()
        except BaseException as e:  # reported to every rank at the safe point (raise_error)
            self.error = e

    def done(self) -> bool:
        return not self.thread.is_alive()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error


def _lower_priority(nice: int) -> None:
    """Raise the calling thread's nice value to ``nice`` (Linux: per thread, by its native id).
    Silently nothing where that is not supported or not permitted: it only shifts CPU shares.
    Elsewhere a thread id is no process id, so setpriority could hit another process: Linux only."""
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if nice > current:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except (AttributeError, OSError):
        pass


_pending: PendingSave | None = None
_arena: StagingArena | None = None
_exit_hook = False


def arena() -> StagingArena:
    """This process's staging buffer (one, reused by every save; free whenever no save is in flight)."""
    global _arena
    if _arena is None:
        _arena = StagingArena()
    return _arena


def in_flight() -> str | None:
    """The label (``<folder>/<tag>``) of this process's uncommitted save, or None."""
    return _pending.label if _pending is not None else None


def submit(comm: Comm, label: str, write: Callable[[], None], commit: Callable[[], object]) -> None:
    """Start ``write`` in the background; ``commit`` runs on every rank at the safe point that finds
    every rank's write done (it does the collectives of the commit). Call ``make_room`` first."""
    global _pending, _exit_hook
    if _pending is not None:
        raise SaveInProgressError(f"internal: {label} submitted while {_pending.label} is in flight")
    if not _exit_hook:
        atexit.register(_at_exit)
        _exit_hook = True
    _pending = PendingSave(comm, label, write, commit)
    _pending.thread.start()


def _finalize(p: PendingSave) -> None:
    global _pending
    _pending = None  # whatever happens next, this save is over: a failed one is not retried
    p.comm.run(p.raise_error)
    p.comm.run(p.commit)
    log.info("asynchronous save %s committed", p.label)


def poll() -> bool:
    """Collective, non-blocking: commit the in-flight save if every rank has written it. True when
    no save is in flight any more. Costs one all-reduce while a save is in flight, nothing otherwise
    (every rank knows whether one is: saves and commits are collective)."""
    p = _pending
    if p is None:
        return True
    if p.comm.all_sum(0 if p.done() else 1):
        return False
    _finalize(p)
    return True


def wait() -> None:
    """Collective: block until this process's in-flight save is committed on every rank (or raise
    its error, on every rank). No-op when none is in flight."""
    p = _pending
    if p is None:
        return
    p.thread.join()
    _finalize(p)


def make_room(on_busy: str = WAIT) -> None:
    """Before a save or load: finalize the in-flight save (``"wait"``), or, with ``"refuse"``,
    raise ``SaveInProgressError`` on every rank if it is still being written."""
    if on_busy not in ON_BUSY:
        raise ValueError(f"on_busy={on_busy!r}: use one of {ON_BUSY}")
    if on_busy == WAIT:
        wait()
    elif not poll():
        raise SaveInProgressError(f"the asynchronous save {_pending.label} is still being written; "
                                  "call ucp_plugin.wait() (or poll() until it returns True) before "
                                  "saving again, or save with on_busy='wait'")


def _at_exit() -> None:
    import torch.distributed as dist

    p = _pending
    if p is None:
        return
    p.thread.join()
    if p.comm.world_size > 1 and not dist.is_initialized():
        log.warning("asynchronous save %s was written but not committed: the process group was "
                    "destroyed first (call ucp_plugin.wait() before destroy_process_group); the "
                    "previous checkpoint and 'latest' are unchanged", p.label)
        return
    try:
        _finalize(p)
    except Exception as e:  # at exit there is no caller to raise to; the previous checkpoint stays
        log.error("asynchronous save %s not committed at exit (%s); 'latest' is unchanged", p.label, e)
