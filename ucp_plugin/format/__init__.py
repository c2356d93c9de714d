"""The universal checkpoint format (docs/FORMAT.md): manifest dataclasses and the state codec.
No torch.distributed and no framework here."""
from .manifest import (ATOM_KINDS, FORMAT_VERSION, MANIFEST, WEIGHT_STATE, Atom, FileEntry, Layout, Manifest,
                       Piece, Region, Writer, check_version, dtype_name, scalar_value)

__all__ = ["ATOM_KINDS", "FORMAT_VERSION", "MANIFEST", "Atom", "FileEntry", "Layout", "Manifest", "Piece",
           "Region", "Writer", "check_version", "dtype_name", "WEIGHT_STATE", "scalar_value"]
