"""``ucp convert`` (distributed form -> consolidated form, one safetensors file per atom) and
``ucp export`` (model weights as one safetensors file). Both read one atom at a time, so memory
stays at the size of the largest parameter, and both commit by writing the manifest last."""
from __future__ import annotations

import os
import shutil
from dataclasses import replace

import torch

from ..errors import FormatError
from ..format import MANIFEST
from ..storage import Checkpoint
from ..storage.atom_files import write_atom
from ..storage.files import atomic_write_text, save_tensors


def _fresh_dir(out: str) -> None:
    if os.path.exists(out) and os.listdir(out):
        raise FormatError(f"{out}: output folder exists and is not empty; choose a new folder")
    os.makedirs(out, exist_ok=True)


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
