"""``ucp convert`` (distributed form -> consolidated form, one safetensors file per atom) and
``ucp export`` (model weights as one safetensors file). Both read one atom at a time, so memory
stays at the size of the largest parameter, and both commit by writing the manifest last."""
from __future__ import annotations

import os
import shutil
from dataclasses import replace

import torch

from ..errors import FormatError
from ..format import MANIFEST, Atom, FileEntry, Piece, Region
from ..storage import Checkpoint
from ..storage.files import atomic_write_text, chunk_digests, save_tensors, sha256_file, write_tensors
from ..storage.writer import CHUNK_ELEMS


def _fresh_dir(out: str) -> None:
    if os.path.exists(out) and os.listdir(out):
        raise FormatError(f"{out}: output folder exists and is not empty; choose a new folder")
    os.makedirs(out, exist_ok=True)


def _atom_file(name: str) -> str:
    return f"atoms/{name.replace('/', '_')}.safetensors"


def write_atom(out: str, atom: Atom, tensors: dict[str, torch.Tensor]) -> tuple[Atom, FileEntry]:
    """One atom's states as ``atoms/<name>.safetensors`` under ``out`` (the consolidated form), fsynced:
    the atom with its pieces, and the file's manifest entry."""
    flat = {s: t.reshape(-1).contiguous() for s, t in tensors.items()}
    return write_atom_file(os.path.join(out, _atom_file(atom.name)), atom, flat)


def write_atom_file(path: str, atom: Atom, flat: dict[str, torch.Tensor], sync: bool = True) -> tuple[Atom, FileEntry]:
    """An atom's 1-D states written to ``path`` (its file, or a temporary name to be renamed to it),
    hashed as they are written (file SHA-256 and chunk digests, never re-read): the atom with its
    pieces and the file's manifest entry. ``sync=False`` leaves the fsync to the caller."""
    w = write_tensors(path, flat, chunks={s: CHUNK_ELEMS for s in flat}, sync=sync)
    rel, whole = _atom_file(atom.name), Region.whole(atom.shape)
    pieces = tuple(Piece(s, rel, s, whole, 0, atom.numel, 0, CHUNK_ELEMS, tuple(d.hex() for d in w.digests[s]))
                   for s in flat)
    return replace(atom, pieces=pieces), FileEntry(rel, w.bytes, w.sha256)


def atom_record(out: str, atom: Atom, flat: dict[str, torch.Tensor]) -> tuple[Atom, FileEntry]:
    """The manifest's view of an atom file already written with these 1-D states."""
    rel = _atom_file(atom.name)
    whole = Region.whole(atom.shape)
    pieces = tuple(Piece(s, rel, s, whole, 0, atom.numel, 0, CHUNK_ELEMS, chunk_digests(t, CHUNK_ELEMS))
                   for s, t in flat.items())
    full = os.path.join(out, rel)
    return replace(atom, pieces=pieces), FileEntry(rel, os.path.getsize(full), sha256_file(full))


def convert(path: str, out: str) -> str:
    ck = Checkpoint.open(path)
    _fresh_dir(out)
    os.makedirs(os.path.join(out, "atoms"))
    atoms, files = [], []
    for atom in ck.manifest.atoms:
        done, entry = write_atom(out, atom, {s: ck.read_atom(atom.name, s) for s in atom.states})
        atoms.append(done)
        files.append(entry)
    for f in ck.manifest.files:
        if f.path.startswith("state/"):
            os.makedirs(os.path.dirname(os.path.join(out, f.path)), exist_ok=True)
            shutil.copyfile(os.path.join(ck.path, f.path), os.path.join(out, f.path))
            files.append(f)
    manifest = replace(ck.manifest, atoms=tuple(atoms), files=tuple(files), index=None)  # pieces inline
    atomic_write_text(os.path.join(out, MANIFEST), manifest.to_json())
    return out


def export_weights(path: str, out: str, dtype: str = "float32") -> str:
    """Model weights (fp32 master of trainable parameters, frozen parameters, buffers) under their
    global names, as one safetensors file ``out``."""
    ck = Checkpoint.open(path)
    target = getattr(torch, dtype)
    tensors = {}
    for atom in ck.top.atoms:
        state = "fp32" if atom.kind == "param" else "param"
        t = ck.read_atom(atom.name, state)
        tensors[atom.name] = t.to(target) if t.is_floating_point() else t
    if os.path.isdir(out):
        out = os.path.join(out, "model.safetensors")
    save_tensors(out, tensors)
    return out
