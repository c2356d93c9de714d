"""The manifest of a universal checkpoint (docs/FORMAT.md): frozen dataclasses and their JSON form.

Pure data: no torch.distributed, no framework. ``Manifest.from_json`` validates what it reads and
raises FormatError naming the file and what is wrong.
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field, fields

from ..errors import FormatError

FORMAT_NAME = "ucp"
FORMAT_VERSION = "1.2"  # 1.1: pieces in per-shard indexes, chunk digests inside the shard files;
# 1.2: a shard file's listed SHA-256 covers its header and chunk digests (FileEntry.digest "chunks")
MANIFEST = "ucp.json"
INDEX = "index/rank-{rank:05d}.json"
ATOM_KINDS = ("param", "frozen", "buffer")
# the state holding an atom's values, by kind: a trained parameter's fp32 master, else the tensor itself
WEIGHT_STATE = {"param": "fp32", "frozen": "param", "buffer": "param"}


def dtype_name(dtype) -> str:
    """The manifest's name of a torch dtype ("float32", "bfloat16", "int64", ...)."""
    return str(dtype).removeprefix("torch.")


def scalar_value(value) -> int | float:
    """A scalar state (optimizer ``step``: a number or a 0-d tensor) as the manifest stores it: an int
    when it is integral (torch AdamW keeps ``step`` as a float tensor), else a float."""
    return int(value) if float(value).is_integer() else float(value)


def is_scalar(value) -> bool:
    """A one-number state: a 0-d tensor (torch's or numpy's) or a Python int/float (not a bool)."""
    if hasattr(value, "ndim") and hasattr(value, "item"):
        return value.ndim == 0
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Layout:
    """The parallel layout that wrote (or will read) a checkpoint. ``etp`` is the expert layers'
    tensor-parallel size (megatron-core's ``expert_tensor_parallel_size``); None means TP (and is
    what manifests written before the field existed decode to)."""
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    sp: bool = False
    zero_stage: int = 0
    param_dtype: str = "float32"
    master_dtype: str = "float32"
    layers_per_stage: tuple[int, ...] | None = None
    etp: int | None = None

    def __post_init__(self):
        for k in ("tp", "pp", "dp", "ep"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                raise ValueError(f"layout {k} must be a positive integer, not {getattr(self, k)!r}")
        if self.etp is not None and (not isinstance(self.etp, int) or self.etp < 1):
            raise ValueError(f"layout etp must be null (= tp) or a positive integer, not {self.etp!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"layout zero_stage must be 0, 1, 2 or 3, not {self.zero_stage!r}")
        if self.layers_per_stage is not None and len(self.layers_per_stage) != self.pp:
            raise ValueError(f"layers_per_stage {self.layers_per_stage} must have PP={self.pp} entries")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    def describe(self) -> str:
        parts = [f"TP{self.tp}", f"PP{self.pp}", f"DP{self.dp}"]
        parts += [f"EP{self.ep}"] if self.ep > 1 else []
        parts += [f"ETP{self.etp}"] if self.expert_tp != self.tp else []
        parts += ["SP"] if self.sp else []
        return "·".join(parts) + f" ZeRO-{self.zero_stage} {self.param_dtype}"


@dataclass(frozen=True)
class Region:
    """The part of an atom one TP rank holds: along ``dim``, the global ``intervals`` concatenated,
    then ``pad`` padding rows that are not part of the atom."""
    dim: int
    intervals: tuple[tuple[int, int], ...]
    pad: int = 0

    @staticmethod
    def whole(shape: tuple[int, ...]) -> "Region":
        return Region(0, ((0, shape[0] if shape else 1),), 0)

    def local_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        shape = tuple(shape) or (1,)
        n = sum(e - s for s, e in self.intervals) + self.pad
        return shape[: self.dim] + (n,) + shape[self.dim + 1:]


@dataclass(frozen=True)
class Piece:
    """Elements ``[start, stop)`` of a region's local tensor (row-major), stored 1-D under ``key``."""
    state: str
    file: str
    key: str
    region: Region
    start: int
    stop: int
    replica: int = 0
    chunk_elems: int = 1 << 16
    digests: tuple[str, ...] = ()
    digest_at: int = -1  # 1.1: first chunk's position in the shard's digest tensor (-1: ``digests``)


@dataclass(frozen=True)
class Atom:
    name: str
    kind: str
    shape: tuple[int, ...]
    split: dict
    states: dict[str, str]
    scalars: dict[str, float | int] = field(default_factory=dict)
    pieces: tuple[Piece, ...] = ()
    # 1.1: where the pieces are, so a reader opens only the shard indexes it needs: (rank, region
    # number in ``regions``, start, stop) = that rank's index lists pieces of this atom within
    # local elements [start, stop) of that region
    shards: tuple[tuple[int, int, int, int], ...] = ()
    regions: tuple[Region, ...] = ()

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class FileEntry:
    """A file of the checkpoint. ``digest`` says what ``sha256`` is the digest of: ``"file"``, every
    byte of the file; ``"chunks"`` (1.2, shard files), the file's first 8 bytes, its header and its
    stored chunk-digest tensor, which cover every tensor byte, so the writer hashes each byte once."""
    path: str
    bytes: int
    sha256: str
    digest: str = "file"

    def __post_init__(self):
        if self.digest not in FILE_DIGESTS:
            raise ValueError(f"file {self.path!r}: digest {self.digest!r} is not one of {FILE_DIGESTS}")


FILE_DIGESTS = ("file", "chunks")


def file_json(f: FileEntry) -> dict:
    """A file entry as stored: ``digest`` only when it is not the 1.0/1.1 whole-file digest."""
    d = asdict(f)
    if f.digest == "file":
        del d["digest"]
    return d


@dataclass(frozen=True)
class Writer:
    adapter: str
    adapter_version: str
    plugin_version: str
    framework: str = ""
    framework_version: str = ""


@dataclass(frozen=True)
class Manifest:
    writer: Writer
    layout: Layout
    atoms: tuple[Atom, ...]
    files: tuple[FileEntry, ...] = ()
    family: str | None = None
    iteration: int | None = None
    state_ranks: int = 0
    model: dict = field(default_factory=dict)
    format_version: str = FORMAT_VERSION
    index: str | None = None  # 1.1: where the shard indexes are (INDEX); None: pieces are in the atoms

    def atom(self, name: str) -> Atom:
        index = self.__dict__.get("_index")
        if index is None:
            index = {a.name: a for a in self.atoms}
            object.__setattr__(self, "_index", index)
        try:
            return index[name]
        except KeyError:
            raise KeyError(name) from None

    @property
    def indexed(self) -> bool:
        """True when pieces live in per-shard indexes (format 1.1) rather than in the atoms."""
        return self.index is not None

    def to_json(self) -> str:
        atoms = [_atom_json(a, self.indexed) for a in self.atoms]
        d = {"format": FORMAT_NAME, "format_version": self.format_version,
             "writer": asdict(self.writer), "layout": asdict(self.layout), "family": self.family,
             "iteration": self.iteration, "model": self.model, "atoms": atoms,
             "files": [file_json(f) for f in self.files],
             "state": {"common": "state/common", "per_rank": "state/rank-{rank:05d}",
                       "ranks": self.state_ranks}}
        if self.indexed:
            d["index"] = self.index
        return json.dumps(d, indent=None if self.indexed else 1, separators=(",", ":") if self.indexed else None)

    @staticmethod
    def from_json(text: str, where: str = MANIFEST) -> "Manifest":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise FormatError(f"{where}: not valid JSON ({e}); the checkpoint is corrupt") from None
        return _decode(d, where)


def _atom_json(a: Atom, indexed: bool) -> dict:
    d = asdict(a)
    if indexed:
        del d["pieces"]
    else:
        del d["shards"], d["regions"]
        d["pieces"] = [piece_json(p) for p in a.pieces]
    return d


def piece_json(p: Piece) -> dict:
    """A piece as stored: 1.0 pieces carry hex ``digests``, 1.1 pieces a ``digest_at``."""
    d = asdict(p)
    d.pop("digests" if p.digest_at >= 0 else "digest_at")
    return d


def decode_piece(p: dict, where: str) -> Piece:
    return _decode_piece(p, where)


def decode_atom(a: dict, where: str) -> Atom:
    return _decode_atom(a, where)


def _index_path(value, where: str) -> str | None:
    if value is not None and value != INDEX:
        raise FormatError(f"{where}: index {value!r} is not {INDEX!r}, the only shard-index layout this "
                          "ucp_plugin reads")
    return value


def check_version(version: object, where: str) -> None:
    try:
        major, minor = (int(x) for x in str(version).split("."))
    except ValueError:
        raise FormatError(f"{where}: format_version {version!r} is not 'MAJOR.MINOR'") from None
    ours = int(FORMAT_VERSION.split(".")[0])
    if major > ours:
        raise FormatError(f"{where}: written in format {version}, newer than this ucp_plugin reads "
                          f"({FORMAT_VERSION}); upgrade ucp_plugin to load it")


@functools.lru_cache(maxsize=None)
def _fields(cls) -> tuple[frozenset, tuple[str, ...]]:
    """(every field name, the required ones) of a dataclass: decoding large manifests asks often."""
    return frozenset(f.name for f in fields(cls)), tuple(f.name for f in fields(cls) if _required(f))


def _build(cls, d: dict, where: str, what: str):
    names, required = _fields(cls)
    missing = [n for n in required if n not in d]
    if missing:
        raise FormatError(f"{where}: {what} lacks field(s) {missing}")
    try:
        return cls(**{k: v for k, v in d.items() if k in names})
    except (TypeError, ValueError) as e:
        raise FormatError(f"{where}: bad {what}: {e}") from None


def _required(f) -> bool:
    from dataclasses import MISSING
    return f.default is MISSING and f.default_factory is MISSING


def _decode_region(r: dict, where: str) -> Region:
    r = r or {}
    return _build(Region, {**r, "intervals": tuple(tuple(i) for i in r.get("intervals", ()))}, where, "region")


def _decode_piece(p: dict, where: str) -> Piece:
    region = _decode_region(p.get("region"), where)
    return _build(Piece, {**p, "region": region, "digests": tuple(p.get("digests", ()))}, where, "piece")


def _decode_atom(a: dict, where: str) -> Atom:
    pieces = tuple(_decode_piece(p, where) for p in a.get("pieces", ()))
    regions = tuple(_decode_region(r, where) for r in a.get("regions", ()))
    shards = tuple(tuple(int(x) for x in s) for s in a.get("shards", ()))
    if any(len(s) != 4 or not 0 <= s[1] < len(regions) for s in shards):
        raise FormatError(f"{where}: atom {a.get('name')!r} has a bad 'shards' entry; the manifest is damaged")
    atom = _build(Atom, {**a, "shape": tuple(a.get("shape", ())), "pieces": pieces, "shards": shards,
                         "regions": regions}, where, "atom")
    if atom.kind not in ATOM_KINDS:
        raise FormatError(f"{where}: atom {atom.name!r} has unknown kind {atom.kind!r}")
    return atom


def _decode(d: dict, where: str) -> Manifest:
    if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
        raise FormatError(f"{where}: not a universal checkpoint manifest (format != {FORMAT_NAME!r})")
    check_version(d.get("format_version"), where)
    lay = dict(d.get("layout") or {})
    if lay.get("layers_per_stage") is not None:
        lay["layers_per_stage"] = tuple(lay["layers_per_stage"])
    state = d.get("state") or {}
    return Manifest(writer=_build(Writer, d.get("writer") or {}, where, "writer"),
                    layout=_build(Layout, lay, where, "layout"),
                    atoms=tuple(_decode_atom(a, where) for a in d.get("atoms", ())),
                    files=tuple(_build(FileEntry, f, where, "file entry") for f in d.get("files", ())),
                    family=d.get("family"), iteration=d.get("iteration"),
                    state_ranks=int(state.get("ranks", 0)), model=dict(d.get("model") or {}),
                    format_version=str(d["format_version"]), index=_index_path(d.get("index"), where))
