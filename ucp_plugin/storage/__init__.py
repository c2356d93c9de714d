"""Readers and writers of the universal format (docs/FORMAT.md). No framework imports here.

The reader and the shard writer make torch tensors; they are imported on first use (PEP 562), so a
tool that only writes files (``ucp convert`` of a native DeepSpeed checkpoint) never imports torch.
"""
import importlib

from .files import read_latest, write_latest

_LAZY = {"Checkpoint": "reader", "resolve": "reader", "ShardWriter": "writer", "commit": "writer",
         "prepare_staging": "writer", "staging_name": "writer"}
__all__ = ["Checkpoint", "ShardWriter", "commit", "prepare_staging", "read_latest", "resolve",
           "staging_name", "write_latest"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
