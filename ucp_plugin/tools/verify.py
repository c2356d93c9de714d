"""``ucp verify``: check a checkpoint completely and report every problem found, not just the first.

Checks: the manifest and (format 1.1) every shard index parse and its version is readable; every listed file exists with its size and
SHA-256; no unknown file sits in the folder; every piece's tensor exists with the recorded length and
dtype; the pieces of every atom state cover each element exactly once (no gap, no overlap).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import numpy as np

from ..errors import FormatError
from ..format import INDEX, MANIFEST, Atom, Manifest
from ..plan import runs
from ..storage import Checkpoint
from ..storage.files import file_sha256, open_tensors


@dataclass(frozen=True)
class Problem:
    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def verify(path: str, hashes: bool = True) -> list[Problem]:
    try:
        ck = Checkpoint.open(path, verify=hashes)
    except FormatError as e:
        return [Problem(path, str(e))]
    folder, (manifest, problems) = ck.path, _whole_manifest(ck, hashes)
    problems += _check_files(folder, manifest, hashes)
    # a missing file is reported once above; a changed one also gets its tensors examined
    skip = {os.path.join(folder, f.path) for f in manifest.files
            if not os.path.isfile(os.path.join(folder, f.path))}
    for rel in sorted({p.file for a in manifest.atoms for p in a.pieces}):
        full = os.path.join(folder, rel)
        if full not in skip:
            try:
                open_tensors(full)
            except FormatError as e:
                problems.append(Problem(full, str(e).split(": ", 1)[1]))
                skip.add(full)
    for atom in manifest.atoms:
        problems += _check_atom(folder, atom, skip)
    return problems


def _whole_manifest(ck: Checkpoint, hashes: bool) -> tuple[Manifest, list[Problem]]:
    """The manifest with every piece and file, from every shard index that reads (format 1.1);
    an index that does not is a problem (a missing one is reported by ``_check_files``)."""
    top = ck.top
    if not top.indexed:
        return top, []
    problems, files, good = [], list(top.files), {}
    for rank in range(top.state_ranks):
        try:
            good[rank] = ck.folder.index(rank, hashes)
            files += good[rank].files
        except FormatError as e:
            if os.path.isfile(os.path.join(ck.path, INDEX.format(rank=rank))):
                problems.append(Problem(os.path.join(ck.path, INDEX.format(rank=rank)), str(e).split(": ", 1)[1]))
    atoms = tuple(replace(a, pieces=tuple(p for r in sorted({s[0] for s in a.shards}) if r in good
                                          for p in good[r].of(a.name)))
                  for a in top.atoms)
    return replace(top, atoms=atoms, files=tuple(files)), problems


def _check_files(folder: str, m: Manifest, hashes: bool) -> list[Problem]:
    problems = []
    listed = {f.path for f in m.files}
    for f in m.files:
        full = os.path.join(folder, f.path)
        if not os.path.isfile(full):
            problems.append(Problem(full, "listed in the manifest but missing; restore it or re-save"))
        elif os.path.getsize(full) != f.bytes:
            problems.append(Problem(full, f"is {os.path.getsize(full)} bytes, the manifest says {f.bytes} "
                                          "(truncated or overwritten); restore it or re-save"))
        elif hashes:
            problems += _check_digest(full, f)
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != MANIFEST and rel not in listed:
                problems.append(Problem(os.path.join(folder, rel), "unknown file, not part of this "
                                        "checkpoint; remove it (nothing reads it)"))
    return problems


def _check_digest(full: str, f) -> list[Problem]:
    try:
        if file_sha256(full, f.digest) == f.sha256:
            return []
    except FormatError as e:
        return [Problem(full, str(e).split(": ", 1)[1])]
    return [Problem(full, "SHA-256 differs from the manifest (the file was modified or damaged); "
                          "restore it or re-save")]


def _check_atom(folder: str, atom: Atom, bad_files: set[str]) -> list[Problem]:
    problems = []
    where = f"parameter {atom.name!r}"
    groups: dict[tuple[str, int], list] = {}
    for p in atom.pieces:
        full = os.path.join(folder, p.file)
        if p.state not in atom.states:
            problems.append(Problem(where, f"piece of undeclared state {p.state!r}"))
            continue
        if full not in bad_files:
            problems += _check_piece(full, p, atom.states[p.state], where)
        groups.setdefault((p.state, p.replica), []).append(runs(p.region, atom.shape, p.start, p.stop))
    for state in atom.states:
        if (state, 0) not in groups:
            problems.append(Problem(where, f"state {state!r} has no pieces; the checkpoint is incomplete"))
    for (state, replica), rs in groups.items():
        msg = _coverage(rs, atom.numel)
        if msg:
            problems.append(Problem(where, f"state {state!r} (replica {replica}): {msg}"))
    return problems


def _check_piece(full: str, piece, dtype: str, where: str) -> list[Problem]:
    try:
        with open_tensors(full) as f:
            if piece.key not in f.keys():
                return [Problem(full, f"has no tensor {piece.key!r} ({where}); the file is from another "
                                      "checkpoint")]
            sl = f.get_slice(piece.key)
            shape, got = sl.get_shape(), sl.get_dtype()
    except FormatError as e:
        return [Problem(full, str(e))]
    problems = []
    if shape != [piece.stop - piece.start]:
        problems.append(Problem(full, f"{piece.key!r} has shape {shape}, the manifest says "
                                      f"[{piece.stop - piece.start}] ({where})"))
    want = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int64": "I64", "int32": "I32",
            "float64": "F64", "uint8": "U8", "bool": "BOOL", "int8": "I8"}.get(dtype, dtype)
    if got != want:
        problems.append(Problem(full, f"{piece.key!r} has dtype {got}, the manifest says {dtype} ({where})"))
    return problems


def _coverage(rs: list, numel: int) -> str | None:
    glob = np.concatenate([r.glob for r in rs])
    length = np.concatenate([r.length for r in rs])
    order = np.argsort(glob, kind="stable")
    glob, length = glob[order], length[order]
    ends = glob + length
    if len(glob) == 0 or glob[0] != 0:
        return f"elements from 0 are not covered (gap before {int(glob[0]) if len(glob) else numel})"
    over = np.nonzero(glob[1:] < ends[:-1])[0]
    if len(over):
        return f"pieces overlap at element {int(glob[over[0] + 1])}"
    gaps = np.nonzero(glob[1:] > ends[:-1])[0]
    if len(gaps):
        return f"gap: elements {int(ends[gaps[0]])}..{int(glob[gaps[0] + 1])} are not covered"
    if ends[-1] != numel:
        return f"covers {int(ends[-1])} of {numel} elements; the rest is missing"
    return None
