"""``ucp convert NATIVE_DIR OUT``: a plain DeepSpeed ZeRO-1/2/3 checkpoint (``engine.save_checkpoint``
without the plugin) rewritten offline as a universal checkpoint in the consolidated form.

It reads through ``dsfiles.native.NativeSource`` (what ``engine.load_checkpoint`` with the plugin
reads: ``plan.zero`` says which saved rank's file holds which element of each parameter). Streaming:
each atom is assembled from its fragments into uninitialised buffers (every element is then counted as
copied, instead of zero-filling first) and written once, hashed as it is written (the chunk digests,
stored in the file: format 1.2), to a temporary name; a background thread fsyncs and renames
it to ``atoms/<name>.safetensors`` while the next atom is read. No temporary copy of the checkpoint.
Neither torch nor DeepSpeed is imported (``dsfiles.ptfile`` reads the rank files into NumPy arrays):
importing torch alone took longer than the whole conversion (docs/BENCHMARKS.md).

Memory bound, one worker: one atom's S states (Adam: fp32, exp_avg, exp_avg_sq; at most S x L, L the
largest parameter's fp32 bytes) plus the mapped rank-file pages touched since they were last given
back (``NativeSource.release`` every L bytes read, checked after each state: below L + L), i.e.
``(S + 2) x L`` above the interpreter's baseline (a test checks it). ``workers`` threads convert
disjoint atoms (copies, hashing, writes and fsyncs release the GIL): ``workers x S x L + (workers + 1)
x L``. Resumable: an atom file at its final name is complete (renamed after its fsync) and is kept, once
its stored digests match its bytes; the manifest, written last, commits.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from .. import __version__
from ..errors import FormatError
from ..format import MANIFEST, Atom, FileEntry, Layout, Manifest, Writer
from ..plan import zero as Z
from ..storage.atom_files import atom_file, atom_record, write_atom_file
from ..storage.files import atomic_write_text, fsync_path, numpy_dtype, save_tree

ADAPTER = "deepspeed.native-convert"
STAGES = {Z.PER_PARAM: 0, Z.ZERO3: 3}
PARTIAL = ".partial"  # an atom file being written; renamed once durable


def _source(folder: str):
    from ..dsfiles.native import NativeSource
    return NativeSource(folder)


def atom_bytes(atom: Atom) -> int:
    return atom.numel * sum(numpy_dtype(d).itemsize for d in atom.states.values())


def _finished(out: str, atom: Atom) -> tuple[Atom, FileEntry] | None:
    """The manifest's view of an atom file a previous run completed, or None."""
    if not os.path.isfile(os.path.join(out, atom_file(atom.name))):
        return None
    try:
        return atom_record(out, atom)
    except FormatError:  # not ours, damaged since, or from an older writer: written again
        return None


class Reader:
    """Reads atoms' states from a source shared by the worker threads, and gives back the mapped
    pages once the bytes read since the last release reach ``budget`` (the largest parameter's fp32
    bytes): per thread the pages touched stay below budget plus one state, while small atoms do not
    pay a release each."""

    def __init__(self, source, budget: int):
        self.source, self.budget, self.since = source, budget, 0
        self._lock = threading.Lock()

    def state(self, atom: Atom, state: str) -> np.ndarray:
        dtype = numpy_dtype(atom.states[state])
        out = self.source.view(atom.name, state)
        if out is None or out.dtype != dtype or out.size != atom.numel:
            out = np.empty(atom.numel, dtype=dtype)
            copied = self.source.fill(out, atom.name, state)
        else:
            copied = atom.numel
        if copied != atom.numel:
            raise FormatError(f"{self.source.path}: parameter {atom.name!r} ({state}): the rank files hold "
                              f"{copied} of its {atom.numel} elements; the checkpoint is incomplete or "
                              "its files come from different saves")
        with self._lock:
            self.since += out.nbytes
            release = self.since >= self.budget
            if release:
                self.since = 0
        if release:
            self.source.release()
        return out

    def atom(self, atom: Atom) -> dict[str, np.ndarray]:
        return {s: self.state(atom, s) for s in atom.states}


def write_atom(out: str, atom: Atom, flat: dict[str, np.ndarray]) -> tuple[Atom, FileEntry, str]:
    """One atom's 1-D states written to ``atoms/<name>.safetensors.partial``, hashed as written, not yet
    durable: the atom with its pieces, the file's manifest entry, and the temporary path."""
    tmp = os.path.join(out, atom_file(atom.name) + PARTIAL)
    return (*write_atom_file(tmp, atom, flat, sync=False), tmp)


def _commit(tmp: str) -> None:
    fsync_path(tmp)
    os.replace(tmp, tmp[:-len(PARTIAL)])


class Converter:
    """Converts atoms (from any thread) and commits their files in one background thread."""

    def __init__(self, source, out: str):
        self.out, self.reader = out, Reader(source, budget(source))
        self._commits = ThreadPoolExecutor(1, thread_name_prefix="ucp-fsync")
        self._pending: list[Future] = []

    def atom(self, atom: Atom) -> tuple[Atom, FileEntry]:
        record = _finished(self.out, atom)
        if record is not None:
            return record
        done, entry, tmp = write_atom(self.out, atom, self.reader.atom(atom))
        self._pending.append(self._commits.submit(_commit, tmp))
        return done, entry

    def close(self) -> None:
        """Wait for every file's fsync and rename (also after an error: what was written is kept)."""
        self._commits.shutdown(wait=True)
        for f in self._pending:
            f.result()
        fsync_path(os.path.join(self.out, "atoms"))


def budget(source) -> int:
    return max(a.numel for a in source.atoms.values()) * 4


def header(source) -> Manifest:
    cfg = (source.model.get("ds_config") or {}).get("zero_optimization") or {}
    stage = int(cfg.get("stage", STAGES.get(source.kind, 1)))
    dtype = "bfloat16" if source.dtype == "bf16" else "float32"
    return Manifest(Writer(ADAPTER, "1", __version__, "deepspeed", str(source.model.get("ds_version", ""))),
                    Layout(dp=source.dp, zero_stage=stage, param_dtype=dtype), (),
                    iteration=source.model.get("global_steps"))


def _convert_all(conv: Converter, atoms: list[Atom], workers: int, bar) -> dict[str, tuple[Atom, FileEntry]]:
    def one(atom: Atom) -> tuple[Atom, FileEntry]:
        record = conv.atom(atom)
        bar.update(atom_bytes(atom))
        return record

    if workers <= 1:
        return {a.name: one(a) for a in atoms}
    with ThreadPoolExecutor(workers, thread_name_prefix="ucp-convert") as pool:
        return dict(zip((a.name for a in atoms), pool.map(one, atoms)))


def convert_native(folder: str, out: str, workers: int = 1, progress: bool = False) -> str:
    from tqdm import tqdm

    source = _source(folder)
    if os.path.isfile(os.path.join(out, MANIFEST)):
        raise FormatError(f"{out}: already a converted checkpoint (ucp.json); choose a new folder")
    os.makedirs(os.path.join(out, "atoms"), exist_ok=True)
    atoms = sorted(source.atoms.values(), key=lambda a: a.name)
    conv = Converter(source, out)
    with tqdm(total=sum(map(atom_bytes, atoms)), unit="B", unit_scale=True, desc="convert",
              disable=not progress) as bar:
        try:
            done = _convert_all(conv, atoms, workers, bar)
        finally:
            conv.close()
    files = [done[a.name][1] for a in atoms] + _state_files(source, out)
    manifest = header(source)
    manifest = Manifest(manifest.writer, manifest.layout, tuple(done[a.name][0] for a in atoms), tuple(files),
                        iteration=manifest.iteration, state_ranks=0)
    atomic_write_text(os.path.join(out, MANIFEST), manifest.to_json())
    return out


def _state_files(source, out: str) -> list[FileEntry]:
    """The training state (engine counters, scheduler, optimizer hyperparameters) as ``state/common``."""
    os.makedirs(os.path.join(out, "state"), exist_ok=True)
    written = save_tree(os.path.join(out, "state", "common"), source.common_state())
    return [FileEntry(os.path.relpath(p, out), size, digest) for p, size, digest in written]
