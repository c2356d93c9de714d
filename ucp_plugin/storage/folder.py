"""One committed checkpoint folder opened for reading: pinned, metadata read on demand.

``PinnedFolder.open`` reads the top manifest only. Shard indexes (format 1.1) are read the first
time an atom they hold is asked for, tensor files the first time a read touches them, so a rank
opens the files holding what it needs and no others (``files_opened`` and ``metadata_bytes``
count them).

Pinning: a save may replace ``<tag>`` while a job reads it (the old folder is renamed aside, then
removed). The folder is opened as a directory descriptor and every file is opened relative to it,
so later reads see the version that was opened even after the rename; a shared ``flock`` on its
``ucp.json`` tells a committing job that the old folder is in use, and the commit leaves it for a
later sweep instead of removing it (``in_use``). flock is host-local: readers on other hosts of a
shared file system are not seen (do not replace a tag while another host loads it).
"""
from __future__ import annotations

import fcntl
import os
import threading

from ..errors import FormatError
from ..format import INDEX, MANIFEST, FileEntry, Manifest, ShardIndex
from .files import TensorFile


def in_use(folder: str) -> bool:
    """True while some process on this host holds ``folder`` open for reading."""
    try:
        fd = os.open(os.path.join(folder, MANIFEST), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops our probe lock


class PinnedFolder:
    def __init__(self, path: str, top: Manifest, dir_fd: int, lock_fd: int, top_bytes: int):
        self.path, self.top = path, top
        self._dir, self._lock = dir_fd, lock_fd
        self._indexes: dict[int, ShardIndex] = {}
        self._tensors: dict[str, TensorFile] = {}
        self._listed = {f.path: f for f in top.files}
        self.metadata_bytes = top_bytes
        self.files_opened: list[str] = []
        self._lock_open = threading.Lock()  # fetches run in a thread pool

    @staticmethod
    def open(folder: str) -> "PinnedFolder | None":
        """The folder pinned, or None when it was replaced while being opened (retry)."""
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            lock_fd = os.open(MANIFEST, os.O_RDONLY, dir_fd=dir_fd)
        except FileNotFoundError:
            os.close(dir_fd)
            return None
        fcntl.flock(lock_fd, fcntl.LOCK_SH)
        try:
            same = os.stat(folder).st_ino == os.fstat(dir_fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(lock_fd), os.close(dir_fd)
            return None
        with os.fdopen(os.dup(lock_fd), "rb") as f:
            text = f.read()
        where = os.path.join(folder, MANIFEST)
        return PinnedFolder(folder, Manifest.from_json(text.decode(), where), dir_fd, lock_fd, len(text))

    def close(self) -> None:
        for f in self._tensors.values():
            f.close()
        self._tensors.clear()
        for fd in (self._lock, self._dir):
            if fd is not None:
                os.close(fd)
        self._lock = self._dir = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to release
            pass

    def count(self, metadata_bytes: int) -> None:
        with self._lock_open:
            self.metadata_bytes += metadata_bytes

    def tensors(self, rel: str) -> TensorFile:
        with self._lock_open:
            return self._tensors_locked(rel)

    def _tensors_locked(self, rel: str) -> TensorFile:
        if rel not in self._tensors:
            try:
                self._tensors[rel] = TensorFile(rel, dir_fd=self._dir)
            except FormatError as e:
                raise FormatError(f"{self.path}/{e}") from None
            self.files_opened.append(rel)
            self.metadata_bytes += self._tensors[rel].header_bytes
        return self._tensors[rel]

    def index(self, rank: int, verify: bool) -> ShardIndex:
        """Rank ``rank``'s shard index, checked against the SHA-256 the top manifest records."""
        if rank not in self._indexes:
            rel = INDEX.format(rank=rank)
            where = os.path.join(self.path, rel)
            try:
                fd = os.open(rel, os.O_RDONLY, dir_fd=self._dir)
            except FileNotFoundError:
                raise FormatError(f"{where}: shard index is missing; the checkpoint is incomplete — restore "
                                  "the file or re-save") from None
            with os.fdopen(fd, "rb") as f:
                data = f.read()
            self.metadata_bytes += len(data)
            _check_listed(self._listed.get(rel), data, where, verify)
            self._indexes[rank] = ShardIndex.from_json(data.decode(), where)
        return self._indexes[rank]

    def all_files(self, verify: bool) -> tuple[FileEntry, ...]:
        """Every file of the checkpoint (index files, then what each rank's index lists)."""
        files = list(self.top.files)
        if self.top.indexed:
            for r in range(self.top.state_ranks):
                files += self.index(r, verify).files
        return tuple(files)


def _check_listed(entry: FileEntry | None, data: bytes, where: str, verify: bool) -> None:
    import hashlib

    if entry is None:
        raise FormatError(f"{where}: not listed in {MANIFEST}; the checkpoint is damaged")
    if len(data) != entry.bytes or (verify and hashlib.sha256(data).hexdigest() != entry.sha256):
        raise FormatError(f"{where}: differs from what {MANIFEST} records (size or SHA-256); the file was "
                          "modified or damaged — restore it or re-save")
