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

    def check(self, name: str, shape: tuple[int, ...], tp: int) -> None:
        """Raise LayoutError if ``tp`` ranks cannot hold a parameter of this global shape."""

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

    def check(self, name, shape, tp):
        _check_dim(name, shape, self.dim)
        if shape[self.dim] % tp:
            raise LayoutError(f"parameter {name!r}: dim {self.dim} of size {shape[self.dim]} is not "
                              f"divisible by TP={tp}; valid TP sizes: {_divisors(shape[self.dim])}")
        if self.groups > 1 and self.groups % tp:
            raise LayoutError(f"parameter {name!r}: TP={tp} does not divide its {self.groups} groups "
                              f"(query groups / heads); valid TP sizes: {_divisors(self.groups)}")


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

    def check(self, name, shape, tp):
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

    def check(self, name, shape, tp):
        _check_dim(name, shape, self.dim)
        sizes = self.part_sizes(shape[self.dim])
        if sum(sizes) != shape[self.dim]:
            raise LayoutError(f"parameter {name!r}: fused parts {list(sizes)} do not add up to dim "
                              f"{self.dim} of size {shape[self.dim]}; fix the model spec")
        bad = [s for s in sizes if s % tp]
        if bad:
            raise LayoutError(f"parameter {name!r}: fused part of size {bad[0]} is not divisible by "
                              f"TP={tp}; valid TP sizes: {_divisors(min(sizes))}")


SPLITS: dict[str, type[Split]] = {c.kind: c for c in (Replicated, Partitioned, VocabPartitioned, Fused)}


def split_from_json(obj: dict) -> Split:
    """Rebuild a split from its manifest encoding; unknown kinds are a FormatError."""
    cls = SPLITS.get(obj.get("kind", ""))
    if cls is None:
        raise FormatError(f"unknown split kind {obj.get('kind')!r} in manifest; known: {sorted(SPLITS)}"
                          " (was the checkpoint written by a newer ucp_plugin?)")
    names = {f.name for f in fields(cls)}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in obj.items() if k in names}
    return cls(**kwargs)
