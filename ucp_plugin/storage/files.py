"""Durable file operations: atomic writes, fsync, hashing, tensor files, state trees, `latest`."""
from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import FormatError
from ..format import treecodec

LATEST = "latest"


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` so that readers see either the old file or the whole new one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def sha256_file(path: str, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def tensor_bytes(t: torch.Tensor):
    """A zero-copy uint8 view of a contiguous CPU tensor (any dtype, bf16 included)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def chunk_digests(t: torch.Tensor, chunk_elems: int) -> tuple[str, ...]:
    flat = t.reshape(-1)
    return tuple(hashlib.sha256(tensor_bytes(flat[i:i + chunk_elems])).hexdigest()
                 for i in range(0, max(flat.numel(), 1), chunk_elems))


def save_tensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors file, fsynced. Tensors must not share storage (callers pass clones/slices)."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def open_tensors(path: str):
    """``safe_open`` with errors that name the file (truncated, not safetensors, missing)."""
    if not os.path.isfile(path):
        raise FormatError(f"{path}: tensor file is missing; the checkpoint is incomplete — re-save it or "
                          "restore the file")
    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # safetensors raises its own error types; all mean "corrupt"
        raise FormatError(f"{path}: not a readable safetensors file ({e}); the file is truncated or "
                          "corrupt — re-save the checkpoint") from None


def save_tree(stem: str, obj) -> list[str]:
    """Write a state tree as ``stem.json`` (+ ``stem.safetensors`` if it holds tensors)."""
    tree, tensors = treecodec.encode(obj, where=os.path.basename(stem))
    written = []
    if tensors:
        save_tensors(stem + ".safetensors", tensors)
        written.append(stem + ".safetensors")
    atomic_write_text(stem + ".json", json.dumps(tree))
    return written + [stem + ".json"]


def load_tree(stem: str):
    if not os.path.isfile(stem + ".json"):
        raise FormatError(f"{stem}.json: training-state file is missing; the checkpoint is incomplete")
    with open(stem + ".json") as f:
        try:
            tree = json.load(f)
        except json.JSONDecodeError as e:
            raise FormatError(f"{stem}.json: not valid JSON ({e}); the file is corrupt") from None
    tensors = {}
    if os.path.exists(stem + ".safetensors"):
        with open_tensors(stem + ".safetensors") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    return treecodec.decode(tree, tensors, where=stem + ".json")


def read_latest(root: str) -> str | None:
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def write_latest(root: str, tag: str) -> None:
    atomic_write_text(os.path.join(root, LATEST), tag)
