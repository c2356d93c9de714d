"""How a family's atoms map onto a Hugging Face ``transformers`` model's tensors: declared data that
``tools.hf_export`` (atoms -> HF) and ``tools.hf_import`` (HF -> atoms) both read, so the two
directions cannot disagree.

Names are templates, not regexes: ``"decoder.layers.{0}.mlp.linear_fc2.weight"`` -> ``
"model.layers.{0}.mlp.down_proj.weight"``; each ``{k}`` is a non-negative integer (a layer, an
expert). Every transformation is a permutation of elements, so export -> import -> export is exact:

- ``Rows``: an HF tensor is a selection of an atom's rows (dim 0). The atom's rows are viewed as
  ``blocks`` equal blocks, each cut into ``parts``; the HF tensor is part ``take[0]`` of every block,
  then part ``take[1]`` of every block, ... Megatron's fused QKV is per query group ``[q_g; k_g; v_g]``
  (``blocks`` = groups): HF's ``q_proj`` is ``Rows(groups, (q, kv, kv), (0,))``; GPT-2's ``c_attn``
  ``[q; k; v]`` is ``Rows(heads, (d, d, d), (0, 1, 2))``. SwiGLU's fc1 ``[gate; up]``:
  ``Rows(1, (ffn, ffn), (0,))``.
- ``transpose``: the HF tensor is the (selected) 2-D matrix transposed (GPT-2's ``Conv1D`` weights).
- ``stack``: the atom is entry ``{stack}`` along a new leading dim of the HF tensor (transformers 5's
  fused Mixtral experts ``gate_up_proj [E, 2*ffn, hidden]``, ``down_proj [E, hidden, ffn]``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

from ..errors import SpecError


@dataclass(frozen=True)
class Rows:
    blocks: int
    parts: tuple[int, ...]
    take: tuple[int, ...]

    def __post_init__(self):
        if self.blocks < 1 or not self.parts or any(p < 1 for p in self.parts):
            raise ValueError(f"Rows: blocks and parts must be positive, got {self}")
        if not self.take or any(not 0 <= t < len(self.parts) for t in self.take):
            raise ValueError(f"Rows.take {self.take} must index parts {self.parts}")

    @property
    def atom_rows(self) -> int:
        return self.blocks * sum(self.parts)

    @property
    def hf_rows(self) -> int:
        return self.blocks * sum(self.parts[t] for t in self.take)

    def ranges(self) -> tuple[tuple[int, int], ...]:
        """The atom's row ranges, in the HF tensor's order."""
        block, out = sum(self.parts), []
        for t in self.take:
            lo = sum(self.parts[:t])
            out += [(b * block + lo, b * block + lo + self.parts[t]) for b in range(self.blocks)]
        return tuple(out)


@dataclass(frozen=True)
class HfRule:
    """Atom ``atom`` (a template) is (part of) HF tensor ``hf`` (a template over the same fields)."""
    atom: str
    hf: str
    rows: Rows | None = None
    transpose: bool = False
    stack: int | None = None

    def __post_init__(self):
        fields_atom, fields_hf = _fields(self.atom), _fields(self.hf)
        want = fields_atom - {self.stack} if self.stack is not None else fields_atom
        if fields_hf != want:
            raise ValueError(f"HfRule {self.atom!r} -> {self.hf!r}: the HF template must use the atom's fields "
                             f"{sorted(want)} (all but the stacked one), not {sorted(fields_hf)}")


@dataclass(frozen=True)
class Segment:
    """Rows ``ranges`` of ``atom`` (None: all), optionally transposed: a contiguous run of an HF tensor."""
    atom: str
    ranges: tuple[tuple[int, int], ...] | None
    transpose: bool


@dataclass(frozen=True)
class HfTensor:
    """One HF tensor: its name, shape, and the atom segments whose bytes follow each other in it."""
    name: str
    shape: tuple[int, ...]
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class HfSpec:
    """A family's HF model: ``config`` fields written to config.json (``fields`` maps HF config keys to
    ``ModelConfig`` fields; ``fixed`` are constants every instance has, ``derived`` follow from the
    sizes) and the tensor ``rules``."""
    architecture: str
    model_type: str
    fields: Mapping[str, str]
    fixed: Mapping[str, object]
    rules: tuple[HfRule, ...]
    derived: Mapping[str, object] = field(default_factory=dict)
    dropped: tuple[str, ...] = ()  # atom templates with no HF tensor (megatron's vocabulary padding rows)

    def rules_for(self, atom: str) -> list[tuple[HfRule, dict[int, int]]]:
        out = [(r, m) for r in self.rules if (m := match(r.atom, atom)) is not None]
        if not out:
            raise SpecError(f"atom {atom!r} has no Hugging Face name in the {self.model_type!r} mapping; add an "
                            "HfRule for it in the family spec")
        return out

    def plan(self, shapes: Mapping[str, tuple[int, ...]]) -> list[HfTensor]:
        """The HF tensors of a checkpoint with these atom shapes, in the atoms' order."""
        tensors: dict[str, list] = {}
        for atom, shape in shapes.items():
            if any(match(d, atom) is not None for d in self.dropped):
                continue
            for rule, fields_ in self.rules_for(atom):
                name = rule.hf.format(*_args(fields_))
                index = fields_.get(rule.stack) if rule.stack is not None else None
                tensors.setdefault(name, []).append((index, rule, atom, tuple(shape)))
        return [_tensor(name, entries) for name, entries in tensors.items()]

    def hf_config(self, values: Mapping[str, object]) -> dict:
        """config.json for one instance; ``values`` are its ModelConfig fields."""
        return {"architectures": [self.architecture], "model_type": self.model_type, **self.fixed,
                **{k: values[v] for k, v in self.fields.items()}, **self.derived}


def _tensor(name: str, entries: list) -> HfTensor:
    stacked = entries[0][0] is not None
    if stacked:
        entries = sorted(entries, key=lambda e: e[0])
        if [e[0] for e in entries] != list(range(len(entries))):
            raise SpecError(f"HF tensor {name!r} stacks atoms {[e[2] for e in entries]} whose indices are not "
                            "0..N-1; the checkpoint lacks some of them")
    segments, shape = [], None
    for _, rule, atom, atom_shape in entries:
        rows = rule.rows
        if rows is not None and atom_shape[0] != rows.atom_rows:
            raise SpecError(f"atom {atom!r} has {atom_shape[0]} rows, the HF mapping expects {rows.atom_rows}; "
                            "the checkpoint's model config does not match it")
        one = ((rows.hf_rows if rows else atom_shape[0]),) + tuple(atom_shape[1:])
        one = one[::-1] if rule.transpose else one
        if shape is not None and one != shape:
            raise SpecError(f"HF tensor {name!r}: atoms of different shapes {shape} and {one} cannot be stacked")
        shape = one
        segments.append(Segment(atom, rows.ranges() if rows else None, rule.transpose))
    if not stacked and len(segments) > 1:
        raise SpecError(f"HF tensor {name!r} is produced by several atoms {[s.atom for s in segments]}; "
                        "make the family's HF rules one-to-one (or stacked)")
    return HfTensor(name, ((len(segments),) if stacked else ()) + shape, tuple(segments))


def _fields(template: str) -> set[int]:
    return {int(k) for k in re.findall(r"\{(\d+)\}", template)}


def _args(fields_: dict[int, int]) -> list[int]:
    return [fields_.get(i, 0) for i in range(max(fields_, default=-1) + 1)]


def template_regex(template: str) -> str:
    parts = re.split(r"(\{\d+\})", template)
    return "".join(f"(?P<f{p[1:-1]}>\\d+)" if re.fullmatch(r"\{\d+\}", p) else re.escape(p) for p in parts)


def match(template: str, name: str) -> dict[int, int] | None:
    """The fields of ``name`` if it is an instance of ``template``."""
    m = re.fullmatch(template_regex(template), name)
    return None if m is None else {int(k[1:]): int(v) for k, v in m.groupdict().items()}
