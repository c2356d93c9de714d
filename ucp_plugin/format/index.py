"""A shard index (format 1.1, ``index/rank-NNNNN.json``): what one rank wrote, so a reader finds the
pieces of an atom by reading only the indexes the top manifest names for it (``Atom.shards``).

Pure data: no torch, no file access. The writing rank fills it while it writes (sizes and SHA-256
of its files, chunk digests of its pieces stored in its shard's digest tensor), so the commit
merges metadata and never reads a shard byte.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from ..errors import FormatError
from .manifest import Atom, FileEntry, Piece, _build, decode_atom, decode_piece, file_json, piece_json

DIGESTS = "ucp.sha256"  # the shard file's tensor of chunk digests: 32 raw bytes each, in piece order
DIGEST_BYTES = 32


@dataclass(frozen=True)
class ShardIndex:
    """``atoms``: the atoms this rank declared (no pieces); ``pieces``: (atom name, piece) in write
    order; ``files``: every file the rank wrote, with its size and SHA-256."""
    rank: int
    atoms: tuple[Atom, ...]
    pieces: tuple[tuple[str, Piece], ...]
    files: tuple[FileEntry, ...]

    def of(self, atom: str) -> tuple[Piece, ...]:
        by_atom = self.__dict__.get("_by_atom")
        if by_atom is None:
            by_atom = {}
            for name, p in self.pieces:
                by_atom.setdefault(name, []).append(p)
            by_atom = {k: tuple(v) for k, v in by_atom.items()}
            object.__setattr__(self, "_by_atom", by_atom)
        return by_atom.get(atom, ())

    def to_json(self) -> str:
        atoms = []
        for a in self.atoms:
            d = asdict(a)
            del d["pieces"], d["shards"], d["regions"]
            atoms.append(d)
        return json.dumps({"rank": self.rank, "atoms": atoms, "files": [file_json(f) for f in self.files],
                           "pieces": [{"atom": n, **piece_json(p)} for n, p in self.pieces]},
                          separators=(",", ":"))

    @staticmethod
    def from_json(text: str, where: str) -> "ShardIndex":
        try:
            d = json.loads(text)
            return ShardIndex(int(d["rank"]), tuple(decode_atom(a, where) for a in d["atoms"]),
                              tuple((p.pop("atom"), decode_piece(p, where)) for p in d["pieces"]),
                              tuple(_build(FileEntry, f, where, "file entry") for f in d["files"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise FormatError(f"{where}: not a readable shard index ({e!r}); the checkpoint is "
                              "damaged — restore the file or re-save") from None
