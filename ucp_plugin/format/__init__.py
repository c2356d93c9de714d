"""The universal checkpoint format (docs/FORMAT.md): manifest dataclasses and the state codec.
No torch.distributed and no framework here."""
from .index import DIGEST_BYTES, DIGESTS, ShardIndex
from .manifest import (ATOM_KINDS, FORMAT_VERSION, INDEX, MANIFEST, Atom, FileEntry, Layout, Manifest, Piece,
                       Region, Writer, check_version, dtype_name)

__all__ = ["ATOM_KINDS", "DIGESTS", "DIGEST_BYTES", "FORMAT_VERSION", "INDEX", "MANIFEST", "ShardIndex", "Atom", "FileEntry", "Layout", "Manifest", "Piece",
           "Region", "Writer", "check_version", "dtype_name"]
