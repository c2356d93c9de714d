"""A model family's checkpoint language: an ordered list of (name pattern -> split) rules, plus the
placements that turn a rank-local parameter name into its global (atom) name.

Vocabulary: a *local name* is what ``model.named_parameters()`` says on one rank (layer and expert
indices local to its pipeline stage / expert-parallel rank); a *global name* is the atom's name, as a
single-rank model would call it. Every parameter must match exactly one rule: an unmatched or
doubly matched parameter is a SpecError naming it. There is no silent default.

An *expert parameter* is one inside a Mixture-of-Experts layer's ``experts`` module (``is_expert``).
Megatron-core splits those over its expert-tensor-parallel ranks (ETP, by default as many as TP) and
every other parameter over TP; ``tensor_parallel_for`` says which size splits a parameter, and every
layout check goes through ``check_split`` so the two cannot drift apart.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from ..errors import LayoutError, SpecError
from .splits import Split, _divisors

PIPELINE = "pp"
EXPERT = "ep"
# the largest TP / PP / EP / ETP size a search for valid layouts tries (``ucp validate``'s nearest
# layouts, ``megatron.validate``'s lists of valid sizes)
MAX_PARALLEL_SIZE = 64
# megatron-core names every routed expert's parameters under a module called "experts" (SequentialMLP
# "mlp.experts.local_experts.K.", TEGroupedMLP / GroupedMLP "mlp.experts."); the router
# ("mlp.router") and shared experts ("mlp.shared_experts") are dense and split over TP
EXPERT_SCOPE = ".experts."


@dataclass(frozen=True)
class Rule:
    """Parameters whose global name fully matches ``pattern`` are split as ``split``.
    ``tied_to`` names the global parameter whose atom this one shares (tied embeddings on the last
    pipeline stage): it is read from that atom and never written twice."""
    pattern: str
    split: Split
    tied_to: str | None = None

    def __post_init__(self):
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"rule pattern {self.pattern!r} is not a valid regex: {e}") from None
        if not isinstance(self.split, Split):
            raise ValueError(f"rule {self.pattern!r}: split must be a Split, not {type(self.split).__name__}")


@dataclass(frozen=True)
class Placement:
    """A name component whose index is local to a rank on ``axis`` ("pp": layers of a pipeline
    stage; "ep": experts of an expert-parallel rank). ``pattern`` has exactly one group, the index."""
    pattern: str
    axis: str

    def __post_init__(self):
        if self.axis not in (PIPELINE, EXPERT):
            raise ValueError(f"placement axis must be {PIPELINE!r} or {EXPERT!r}, not {self.axis!r}")
        if re.compile(self.pattern).groups != 1:
            raise ValueError(f"placement pattern {self.pattern!r} must have exactly one group (the index)")

    def shift(self, name: str, delta: int) -> str:
        def repl(m: re.Match) -> str:
            idx = int(m.group(1)) + delta
            return m.group(0)[: m.start(1) - m.start(0)] + str(idx) + m.group(0)[m.end(1) - m.start(0):]
        return re.sub(self.pattern, repl, name)

    def index(self, name: str) -> int | None:
        m = re.search(self.pattern, name)
        return int(m.group(1)) if m else None


@dataclass(frozen=True)
class ModelSpec:
    """The checkpoint language of one model family instance (its rules depend on the config:
    hidden size, heads, query groups, experts, tied embeddings)."""
    family: str
    rules: tuple[Rule, ...]
    placements: tuple[Placement, ...] = ()
    num_layers: int = 0
    num_experts: int = 0
    attributes: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self):
        if not self.rules:
            raise ValueError(f"model spec {self.family!r} has no rules")

    def rule_for(self, global_name: str) -> Rule:
        hits = [r for r in self.rules if re.fullmatch(r.pattern, global_name)]
        if not hits:
            raise SpecError(f"parameter {global_name!r} matches no rule of the {self.family!r} checkpoint "
                            "language; add a rule for it in the model family's spec")
        if len(hits) > 1:
            raise SpecError(f"parameter {global_name!r} matches {len(hits)} rules of the {self.family!r} "
                            f"language ({[r.pattern for r in hits]}); make the patterns exclusive")
        return hits[0]

    def split_for(self, global_name: str) -> Split:
        return self.rule_for(global_name).split

    def check_names(self, global_names: Iterable[str]) -> None:
        """Every parameter matches exactly one rule (raises on the first that does not)."""
        for name in global_names:
            self.rule_for(name)

    def to_global(self, local_name: str, offsets: Mapping[str, int]) -> str:
        """Local name on a rank -> atom name; ``offsets`` gives the first global index per axis."""
        for p in self.placements:
            if offsets.get(p.axis):
                local_name = p.shift(local_name, offsets[p.axis])
        return local_name

    def to_local(self, global_name: str, offsets: Mapping[str, int]) -> str:
        for p in self.placements:
            if offsets.get(p.axis):
                global_name = p.shift(global_name, -offsets[p.axis])
        return global_name

    def check_layout(self, tp: int, pp: int, ep: int, shapes: Mapping[str, tuple[int, ...]],
                     etp: int | None = None) -> None:
        """Raise LayoutError (with the valid choices) if TP/PP/EP/ETP cannot hold this model
        (``etp`` None: the expert parameters are split over TP, megatron's default)."""
        check_pipeline(self.family, self.num_layers, pp)
        check_experts(self.family, self.num_experts, ep)
        for name, shape in shapes.items():
            check_split(name, self.split_for(name), tuple(shape), tp, etp)


def is_expert(name: str) -> bool:
    """Whether ``name`` (local or global) is a routed expert's parameter (see ``EXPERT_SCOPE``)."""
    return EXPERT_SCOPE in name


def tensor_parallel_for(name: str, tp: int, etp: int | None) -> tuple[str, int]:
    """("TP", tp) or, for an expert parameter when an expert-tensor-parallel size is set,
    ("ETP", etp): the size that splits ``name`` and the name the error messages give it."""
    if etp is not None and is_expert(name):
        return "ETP", etp
    return "TP", tp


def check_split(name: str, split: Split, shape: tuple[int, ...], tp: int, etp: int | None = None) -> None:
    """Raise LayoutError if the layout's TP (or, for an expert parameter, ETP) cannot split ``name``."""
    axis, size = tensor_parallel_for(name, tp, etp)
    split.check(name, tuple(shape), size, axis)


def check_pipeline(family: str, num_layers: int, pp: int) -> None:
    """PP stages each need a layer (``num_layers`` 0 means unknown: nothing to check)."""
    if num_layers and pp > num_layers:
        raise LayoutError(f"PP={pp} is larger than the {num_layers} layers of this {family} model; "
                          f"valid PP sizes: 1..{num_layers}")


def check_experts(family: str, num_experts: int, ep: int) -> None:
    """EP ranks split the experts evenly; a dense model (0 experts) takes only EP=1."""
    if ep > 1 and (not num_experts or num_experts % ep):
        valid = [d for d in range(1, num_experts + 1) if num_experts % d == 0] or [1]
        raise LayoutError(f"EP={ep} does not divide the {num_experts} experts of this {family} model; "
                          f"valid EP sizes: {valid}")


def check_expert_grid(tp: int, dp: int, ep: int, etp: int | None = None) -> None:
    """The expert layers' ranks are the dense layers' TP x DP ranks of a pipeline stage, re-cut as
    ETP x EP x expert-DP (megatron-core's ``initialize_model_parallel``: the world size must be
    divisible by ETP * EP * PP), so ETP * EP must divide TP * DP. With ETP = TP (the default) that
    is: EP divides DP."""
    expert_tp = tp if etp is None else etp
    ranks = tp * dp
    if ranks % (expert_tp * ep) == 0:
        return
    etps = [e for e in _divisors(ranks) if ranks % (e * ep) == 0]
    fix = f"; or keep EP={ep} and set ETP (etp) to one of {etps}" if etps else ""
    if expert_tp == tp:
        raise LayoutError(f"EP={ep} must divide DP={dp}: megatron carves expert-parallel ranks out of the "
                          f"data-parallel ones (with ETP = TP); valid EP: {_divisors(dp)}{fix}")
    raise LayoutError(f"ETP={expert_tp} x EP={ep} must divide TP x DP = {ranks}: megatron-core lays the expert "
                      "layers' ETP x EP x expert-DP ranks over the dense layers' TP x DP ranks; valid ETP at "
                      f"EP={ep}: {etps or 'none (lower EP)'}")

