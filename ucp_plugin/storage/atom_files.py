"""The consolidated form's atom files (``atoms/<name>.safetensors``, written by ``ucp convert``,
``ucp import`` and the native converter): one file per atom, its states 1-D, their chunk digests
stored after them as a shard stores its own (format 1.2), so each byte is hashed once, as it is
written. States are torch tensors or NumPy arrays: the native converter writes without torch."""
from __future__ import annotations

import os
from dataclasses import replace

from ..errors import FormatError
from ..format import DIGESTS, Atom, FileEntry, Piece, Region
from .files import CHUNK_ELEMS, TensorFile, stored_digests, write_tensors


def atom_file(name: str) -> str:
    return f"atoms/{name.replace('/', '_')}.safetensors"


def write_atom(out: str, atom: Atom, states: dict) -> tuple[Atom, FileEntry]:
    """One atom's states as ``atoms/<name>.safetensors`` under ``out``, fsynced: the atom with its
    pieces, and the file's manifest entry."""
    return write_atom_file(os.path.join(out, atom_file(atom.name)), atom, states)


def write_atom_file(path: str, atom: Atom, states: dict, sync: bool = True) -> tuple[Atom, FileEntry]:
    """An atom's states, flattened, written to ``path`` (its file, or a temporary name to be renamed to it)
    with their chunk digests stored after them, as a shard stores its own (format 1.2: each byte is
    hashed once, as it is written, never re-read): the atom with its pieces and the file's manifest
    entry. ``sync=False`` leaves the fsync to the caller."""
    w = write_tensors(path, states, chunks={s: CHUNK_ELEMS for s in states}, digest_key=DIGESTS, sync=sync)
    return _record(atom, w.digests, FileEntry(atom_file(atom.name), w.bytes, w.sha256, w.digest))


def atom_record(out: str, atom: Atom) -> tuple[Atom, FileEntry]:
    """The manifest's view of an atom file ``write_atom_file`` wrote earlier, from the file alone: its
    stored chunk digests, each checked against the bytes (``FormatError`` if the file is damaged or
    does not hold the atom's states)."""
    full = os.path.join(out, atom_file(atom.name))
    with TensorFile(full) as tf:
        held = {k: (tf.dtype_name(k), tf.numel(k)) for k in tf.keys() if k != DIGESTS}
        if held != {s: (d, atom.numel) for s, d in atom.states.items()}:
            raise FormatError(f"{full}: holds {held}, not the states of parameter {atom.name!r}; remove it")
        sha, digests = stored_digests(tf)
        size = os.fstat(tf.fileno()).st_size
    return _record(atom, digests, FileEntry(atom_file(atom.name), size, sha, "chunks"))


def _record(atom: Atom, digests: dict[str, list[bytes]], entry: FileEntry) -> tuple[Atom, FileEntry]:
    whole = Region.whole(atom.shape)
    pieces = tuple(Piece(s, entry.path, s, whole, 0, atom.numel, 0, CHUNK_ELEMS, tuple(d.hex() for d in digests[s]))
                   for s in atom.states)
    return replace(atom, pieces=pieces), entry
