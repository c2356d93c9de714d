"""Distributed save orchestration shared by the framework adapters.

``save_universal`` runs the writer protocol of ``storage.writer`` across ranks: a common staging
folder, every rank writing its shard, rank 0 committing under an exclusive lock on the save folder
(two jobs saving into one folder are serialised at commit; each has its own staging folder).
With ``asynchronous=True`` the shard is written in the background and committed later
(``async_save``).
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

from . import __version__
from . import async_save
from .comm import Comm
from .format import Layout, Manifest, Writer
from .storage import ShardWriter, commit, faults, prepare_staging, staging_name
from .storage.snapshot import Snapshot

LOCK = ".ucp.lock"


@dataclass(frozen=True)
class SaveHeader:
    """What rank 0 records in the manifest besides the atoms."""
    adapter: str
    adapter_version: str
    framework: str
    framework_version: str
    layout: Layout
    family: str | None = None
    iteration: int | None = None
    model: dict = field(default_factory=dict)

    def manifest(self) -> Manifest:
        """The manifest without atoms and files (rank 0 completes it at commit)."""
        writer = Writer(self.adapter, self.adapter_version, __version__, self.framework,
                        self.framework_version)
        return Manifest(writer, self.layout, (), family=self.family, iteration=self.iteration,
                        model=dict(self.model))


@contextmanager
def save_lock(root: str):
    fd = os.open(os.path.join(root, LOCK), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _prepare(root: str, name: str, rank: int) -> str:
    try:
        faults.point("staging", rank)
        os.makedirs(root, exist_ok=True)
        return prepare_staging(root, name)
    except OSError as e:
        raise OSError(e.errno, f"cannot create the save folder {root!r} ({e.strerror}); save to a "
                               "writable path with free space") from e


def save_universal(comm: Comm, root: str, tag: str, header: SaveHeader,
                   fill: Callable[[ShardWriter], None], update_latest: bool = True, *,
                   asynchronous: bool = False, on_busy: str = async_save.WAIT) -> str:
    """Every rank calls this; ``fill`` adds that rank's fragments and state. Returns the folder
    (with ``asynchronous=True`` it exists once the save is committed: ``async_save``). A save still in
    flight is finalized first, or refused (``on_busy``)."""
    async_save.make_room(on_busy)
    name = comm.broadcast_str(staging_name(tag))
    # every rank creates the folders inside the agreement: a read-only or full path is one clear
    # error on every rank, not rank 0 failing alone while the others wait in the next collective
    staging = comm.run(lambda: _prepare(root, name, comm.rank))

    def publish() -> str | None:
        if comm.rank != 0:
            return None
        with save_lock(root):
            return commit(root, staging, tag, comm.world_size, header.manifest(), update_latest)

    if asynchronous:
        snapshot = comm.run(lambda: _snapshot(comm.rank, fill))
        async_save.submit(comm, os.path.join(root, tag), lambda: _write(staging, comm.rank, snapshot.replay),
                          publish)
        return os.path.join(root, tag)
    comm.run(lambda: _write(staging, comm.rank, fill))
    comm.run(publish)
    return os.path.join(root, tag)


def _snapshot(rank: int, fill: Callable[[ShardWriter], None]) -> Snapshot:
    snapshot = Snapshot(rank)
    fill(snapshot)
    snapshot.copy_into(async_save.arena())
    return snapshot


def _write(staging: str, rank: int, fill: Callable[[ShardWriter], None]) -> None:
    writer = ShardWriter(staging, rank)
    fill(writer)
    writer.finish()
