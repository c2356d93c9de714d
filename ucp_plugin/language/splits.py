"""How one parameter is split across the tensor-parallel ranks of a layout: the UCP pattern language.

Each split is a frozen, validated value. It says nothing about files or processes; the planner
(``ucp_plugin.plan``) turns a split plus a global shape plus a rank into exact element offsets.
Splits are encoded in the manifest as ``{"kind": ..., **fields}`` (see ``to_json``/``split_from_json``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import ClassVar

from ..errors import FormatError, LayoutError


@dataclass(frozen=True)
class Split:
    kind: ClassVar[str] = ""

    def check(self, name: str, shape: tuple[int, ...], tp: int, axis: str = "TP") -> None:
        """Raise LayoutError if ``tp`` ranks cannot hold a parameter of this global shape. ``axis``
        names the size in the message: "TP", or "ETP" for an expert parameter split over megatron's
        expert-tensor-parallel ranks (``spec.tensor_parallel_for``)."""

    def to_json(self) -> dict:
        return {"kind": self.kind, **{k: (list(v) if isinstance(v, tuple) else v)
                                      for k, v in asdict(self).items()}}


def _check_dim(name: str, shape: tuple[int, ...], dim: int) -> None:
    if not -len(shape) <= dim < len(shape) or not shape:
        raise LayoutError(f"parameter {name!r} of shape {list(shape)} has no dim {dim}; fix the model spec")


def _divisors(n: int, limit: int = 64) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


@dataclass(frozen=True)
class Replicated(Split):
    """Every TP rank holds the whole tensor. ``reduce`` says how copies are consolidated:
    "first" takes rank 0's, "check" requires bitwise equality, "average" averages them."""
    kind: ClassVar[str] = "replicated"
    reduce: str = "first"

    def __post_init__(self):
        if self.reduce not in ("first", "check", "average"):
            raise ValueError(f"Replicated.reduce must be 'first', 'check' or 'average', not {self.reduce!r}")


@dataclass(frozen=True)
class Partitioned(Split):
    """Split evenly along ``dim`` into TP contiguous chunks (column/row-parallel linears).
    ``groups`` > 1 requires TP to divide ``groups`` too (e.g. Megatron's fused QKV, interleaved per
    query group, is contiguous per group along dim 0: TP must divide the number of query groups)."""
    kind: ClassVar[str] = "partitioned"
    dim: int = 0
    groups: int = 1

    def check(self, name, shape, tp, axis="TP"):
        _check_dim(name, shape, self.dim)
        if shape[self.dim] % tp:
            raise LayoutError(f"parameter {name!r}: dim {self.dim} of size {shape[self.dim]} is not "
                              f"divisible by {axis}={tp}; valid {axis} sizes: {_divisors(shape[self.dim])}")
        if self.groups > 1 and self.groups % tp:
            raise LayoutError(f"parameter {name!r}: {axis}={tp} does not divide its {self.groups} groups "
                              f"(query groups / heads); valid {axis} sizes: {_divisors(self.groups)}")


@dataclass(frozen=True)
class VocabPartitioned(Split):
    """Split along ``dim`` after padding that dim up to a multiple of ``divisible_by * TP``
    (Megatron's ``make-vocab-size-divisible-by``). The atom keeps the unpadded size; padding rows are
    dropped on save and re-created as zeros for the target TP."""
    kind: ClassVar[str] = "vocab_partitioned"
    dim: int = 0
    divisible_by: int = 128

    def __post_init__(self):
        if self.divisible_by < 1:
            raise ValueError(f"VocabPartitioned.divisible_by must be >= 1, not {self.divisible_by}")

    def check(self, name, shape, tp, axis="TP"):
        _check_dim(name, shape, self.dim)

    def padded_size(self, size: int, tp: int) -> int:
        multiple = self.divisible_by * tp
        return -(-size // multiple) * multiple


@dataclass(frozen=True)
class Fused(Split):
    """Sub-parameters concatenated along ``dim``, each split evenly across TP and the local pieces
    concatenated again (SwiGLU's fc1 = [gate; up]: ``Fused(dim=0, parts=(ffn, ffn))``). ``parts`` are
    the global sizes along ``dim``; an empty tuple means ``num_parts`` equal parts."""
    kind: ClassVar[str] = "fused"
    dim: int = 0
    parts: tuple[int, ...] = ()
    num_parts: int = 2

    def part_sizes(self, size: int) -> tuple[int, ...]:
        if self.parts:
            return tuple(self.parts)
        return (size // self.num_parts,) * self.num_parts

    def check(self, name, shape, tp, axis="TP"):
        _check_dim(name, shape, self.dim)
        sizes = self.part_sizes(shape[self.dim])
        if sum(sizes) != shape[self.dim]:
            raise LayoutError(f"parameter {name!r}: fused parts {list(sizes)} do not add up to dim "
                              f"{self.dim} of size {shape[self.dim]}; fix the model spec")
        bad = [s for s in sizes if s % tp]
        if bad:
            raise LayoutError(f"parameter {name!r}: fused part of size {bad[0]} is not divisible by "
                              f"{axis}={tp}; valid {axis} sizes: {_divisors(min(sizes))}")


@dataclass(frozen=True)
class Blocks(Split):
    """A parameter holding several atoms' local tensors, one consecutive block each (megatron's legacy
    GroupedMLP: one tensor per EP rank holding all its experts). Block k is the local tensor of atom
    ``atom.format(index=first + k)`` (named relative to the parameter's module, i.e. the parameter name
    with its last component replaced), split across TP by ``inner``; ``transposed`` blocks store that
    2-D local tensor transposed. The blocks are row-major 2-D matrices whose dim ``shared_dim`` has the
    parameter's size along the same dim (GroupedMLP's weight1 [hidden, E*n] holds E blocks [hidden, n]:
    ``shared_dim=0``; weight2 [E*n, hidden] holds E blocks [n, hidden]: ``shared_dim=1``). The block
    count and first index come from the layout (the adapter knows the EP rank); the atoms, not this
    parameter, are what the checkpoint stores, so a Blocks split never appears in a manifest."""
    kind: ClassVar[str] = "blocks"
    atom: str
    inner: Split
    shared_dim: int = 0
    transposed: bool = True

    def __post_init__(self):
        if "{index}" not in self.atom:
            raise ValueError(f"Blocks.atom must contain '{{index}}' (the block's atom index), not {self.atom!r}")
        if isinstance(self.inner, (Blocks, VocabPartitioned)):
            raise ValueError(f"Blocks.inner must be a replicated, partitioned or fused split, not {self.inner}")
        if self.shared_dim not in (0, 1):
            raise ValueError(f"Blocks.shared_dim must be 0 or 1 (blocks are 2-D), not {self.shared_dim}")

    def atom_name(self, name: str, index: int) -> str:
        """The global atom name of block ``index`` of parameter ``name``."""
        module = name.rsplit(".", 1)[0] + "." if "." in name else ""
        return module + self.atom.format(index=index)

    def block_shape(self, name: str, shape: tuple[int, ...], count: int) -> tuple[int, int]:
        """The 2-D shape of each of ``count`` blocks of a local parameter of ``shape``."""
        numel = 1
        for s in shape:
            numel *= s
        if len(shape) != 2 or count < 1 or numel % (count * shape[self.shared_dim]):
            raise LayoutError(f"parameter {name!r} of shape {list(shape)} cannot hold {count} blocks whose "
                              f"dim {self.shared_dim} is {shape[self.shared_dim] if len(shape) == 2 else '?'}; "
                              "fix the model spec (Blocks.shared_dim) or the expert count")
        other = numel // count // shape[self.shared_dim]
        return (shape[0], other) if self.shared_dim == 0 else (other, shape[1])

    def to_json(self) -> dict:
        return {"kind": self.kind, "atom": self.atom, "inner": self.inner.to_json(),
                "shared_dim": self.shared_dim, "transposed": self.transposed}


SPLITS: dict[str, type[Split]] = {c.kind: c for c in (Replicated, Partitioned, VocabPartitioned, Fused, Blocks)}


def split_from_json(obj: dict) -> Split:
    """Rebuild a split from its manifest encoding; unknown kinds are a FormatError."""
    cls = SPLITS.get(obj.get("kind", ""))
    if cls is None:
        raise FormatError(f"unknown split kind {obj.get('kind')!r} in manifest; known: {sorted(SPLITS)}"
                          " (was the checkpoint written by a newer ucp_plugin?)")
    names = {f.name for f in fields(cls)}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in obj.items() if k in names}
    if isinstance(kwargs.get("inner"), dict):
        kwargs["inner"] = split_from_json(kwargs["inner"])
    return cls(**kwargs)
