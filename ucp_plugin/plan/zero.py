"""Where every element of every DeepSpeed optimizer buffer comes from: pure geometry, ints only.

Terms (line numbers: deepspeed 0.19.8, see docs/deepspeed-internals.md):

- *group*: the parameters of one optimizer param group as the base optimizer holds them, in order,
  as ``(name, numel)``. Every wrapper drops frozen and zero-element parameters
  (``is_optimized_parameter``, runtime/utils.py:815), so callers must drop them too, except for
  stage 0 fp32, where no wrapper exists and the torch optimizer keeps whatever it was given (frozen
  parameters included: they get an index and a buffer, but never a state).
- *buffer*: one 1-D fp32 tensor the base optimizer sees as a single parameter, so it has one state
  entry (``exp_avg``/``exp_avg_sq`` of the same length, a ``step``). ``Buffer.index`` is its position
  in the base optimizer's parameter order, i.e. its key in ``optimizer.state_dict()["state"]``.
- *fragment*: a contiguous run of one parameter's (flattened, row-major) elements in a buffer.
- *padding*: buffer elements that belong to no parameter. Zeros in the flat kinds' weights, but
  uninitialised memory in ZeRO-3 (``ds_tensor`` is ``torch.empty``, partition_parameters.py:1836);
  optimizer states there are whatever the optimizer computed. Never save or trust padding.

Kinds of optimizer wrapper (chosen by ``optimizer_kind``, mirroring engine.py:2294):

- ``ZERO_FLAT`` - ``DeepSpeedZeroOptimizer`` (ZeRO-1/2, zero/stage_1_and_2.py:421-580): each group is
  flattened in order, with ``param_alignment`` padding after every parameter but the last (only with
  ``zero_optimization.parameter_alignment``), then zero-padded to a multiple of ``2 * dp``
  (``nccl_start_alignment_factor`` = 2, line 387); rank r holds the r-th of ``dp`` equal slices.
- ``BF16_FLAT`` - ``BF16_Optimizer`` (runtime/bf16_optimizer.py:152-237): as ZERO_FLAT, never any
  per-parameter padding.
- ``ZERO3`` - ``DeepSpeedZeroOptimizer_Stage3``: every parameter is padded to ``ceil(numel/dp)*dp``
  and rank r's ``ds_tensor`` is elements ``[r*ps, (r+1)*ps)`` (zero/partition_parameters.py:1690-1860);
  a buffer is one *sub-group*: the concatenated ``ds_tensor``s of consecutive parameters, closed once
  their partition sizes reach ``sub_group_size`` (zero/stage3.py:1210-1231, 913-1000).
- ``FUSED_FLAT`` - ``FP16_Optimizer`` (stage 0, fp16/bf16, FusedAdam): one unpadded buffer per group,
  replicated on every rank (runtime/fp16/fused_optimizer.py:88-101).
- ``PER_PARAM`` - no wrapper (stage 0 fp32) or ``FP16_UnfusedOptimizer``: one buffer per parameter,
  replicated on every rank.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

from ..errors import LayoutError, UnsupportedError

ZERO_FLAT = "zero_flat"
BF16_FLAT = "bf16_flat"
ZERO3 = "zero3"
FUSED_FLAT = "fused_flat"
PER_PARAM = "per_param"
KINDS = (ZERO_FLAT, BF16_FLAT, ZERO3, FUSED_FLAT, PER_PARAM)
NCCL_START_ALIGNMENT_FACTOR = 2  # stage_1_and_2.py:387, bf16_optimizer.py:102
DEFAULT_SUB_GROUP_SIZE = 1_000_000_000  # zero/config.py:182

Group = Sequence[tuple[str, int]]


@dataclass(frozen=True)
class Fragment:
    """Elements ``[param_offset, param_offset + length)`` of parameter ``name`` sit at
    ``[buffer_offset, buffer_offset + length)`` of the buffer holding this fragment."""
    name: str
    param_offset: int
    length: int
    buffer_offset: int


@dataclass(frozen=True)
class Buffer:
    """One flat optimizer buffer of one rank (see module docstring)."""
    rank: int
    index: int
    group: int
    numel: int
    fragments: tuple[Fragment, ...]

    @property
    def padding(self) -> int:
        return self.numel - sum(f.length for f in self.fragments)


@dataclass(frozen=True)
class FragmentSlot:
    """Where one fragment of a parameter lives: on ``rank``, in its buffer number ``index``."""
    rank: int
    index: int
    fragment: Fragment


@dataclass(frozen=True)
class FlatGroup:
    """One group flattened as ZERO_FLAT/BF16_FLAT/FUSED_FLAT do, before it is cut into partitions.
    ``offsets[i]``/``paddings[i]``: where parameter i starts and the padding after it
    (``round_robin_bit16_offsets``/``round_robin_bit16_padding``); ``total``: the flat length."""
    offsets: tuple[int, ...]
    paddings: tuple[int, ...]
    total: int
    partition_size: int


@dataclass(frozen=True)
class ZeroLayout:
    """Every buffer of every rank for one (groups, dp, kind). ``replicated``: every rank holds the same
    buffers (stage 0), so one copy suffices when saving."""
    kind: str
    dp: int
    buffers: tuple[Buffer, ...]
    replicated: bool

    def for_rank(self, rank: int) -> tuple[Buffer, ...]:
        if not 0 <= rank < self.dp:
            raise LayoutError(f"rank {rank} is outside data-parallel world size {self.dp}")
        return tuple(b for b in self.buffers if b.rank == rank)

    @functools.cached_property
    def _by_param(self) -> dict[str, tuple[FragmentSlot, ...]]:
        found: dict[str, list[FragmentSlot]] = {}
        for b in self.buffers:
            for f in b.fragments:
                found.setdefault(f.name, []).append(FragmentSlot(b.rank, b.index, f))
        return {k: tuple(sorted(v, key=lambda p: (p.rank, p.fragment.param_offset))) for k, v in found.items()}

    def locate(self, name: str) -> tuple[FragmentSlot, ...]:
        """Every fragment of parameter ``name``, by rank then offset (replicas appear once per rank)."""
        if name not in self._by_param:
            raise LayoutError(f"parameter {name!r} is in no optimizer buffer of this {self.kind} layout; "
                              "frozen or zero-element parameters are saved outside the optimizer")
        return self._by_param[name]


def param_alignment(element_size: int, enabled: bool) -> int:
    """Per-parameter alignment in elements for ZERO_FLAT (stage_1_and_2.py:444): 16 bytes when
    ``zero_optimization.parameter_alignment`` is on, else 1."""
    return 16 // _gcd(16, element_size) if enabled else 1


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def optimizer_kind(stage: int, dtype: str, grad_accum_dtype: str | None = None, *, fused: bool = False,
                   pipeline: bool = False, cpu_offload: bool = False) -> str:
    """Which wrapper DeepSpeed builds (engine.py:2294-2325, 2358-2366); dtypes "fp32"/"bf16"/"fp16"."""
    accum = grad_accum_dtype or dtype
    if stage == 3:
        return ZERO3
    if stage in (1, 2):
        one_bf16 = stage == 1 and dtype == "bf16" and accum == "fp32" and not cpu_offload
        return BF16_FLAT if one_bf16 else ZERO_FLAT
    if stage != 0:
        raise LayoutError(f"ZeRO stage {stage} does not exist; use 0, 1, 2 or 3")
    if dtype != accum:
        raise UnsupportedError(f"DeepSpeed stage 0 rejects dtype {dtype} with data_types.grad_accum_dtype "
                               f"{accum} (engine.py:2323); make them equal or use ZeRO-1")
    if dtype == "fp32":
        return PER_PARAM
    if dtype == "bf16" and pipeline:
        return BF16_FLAT
    return FUSED_FLAT if fused else PER_PARAM


def flat_group(numels: Sequence[int], dp: int, *, alignment: int = 1, tail_multiple: int | None = None) -> FlatGroup:
    """Flatten one group: ``alignment`` padding after every parameter but the last
    (stage_1_and_2.py:490-499), then pad the end to ``tail_multiple`` (default ``2 * dp``,
    utils.py:994 ``align_dense_tensors``)."""
    _check_positive(numels)
    offsets, paddings, cur = [], [], 0
    for i, n in enumerate(numels):
        offsets.append(cur)
        cur += n
        pad = 0 if i == len(numels) - 1 else (-cur) % alignment
        paddings.append(pad)
        cur += pad
    multiple = NCCL_START_ALIGNMENT_FACTOR * dp if tail_multiple is None else tail_multiple
    total = cur + (-cur) % multiple
    return FlatGroup(tuple(offsets), tuple(paddings), total, total // dp)


def _check_positive(numels: Sequence[int]) -> None:
    if not numels:
        raise LayoutError("a param group has no optimized parameters; drop empty groups as DeepSpeed does")
    bad = [n for n in numels if n <= 0]
    if bad:
        raise LayoutError(f"parameter sizes must be > 0, got {bad}; zero-element parameters are not optimized")


def _fragments_in(names: Sequence[str], numels: Sequence[int], offsets: Sequence[int], start: int,
                  size: int):
    """Fragments of the params laid at ``offsets`` that fall in the flat window [start, start+size)."""
    out = []
    for name, n, off in zip(names, numels, offsets):
        lo, hi = max(off, start), min(off + n, start + size)
        if lo < hi:
            out.append(Fragment(name, lo - off, hi - lo, lo - start))
    return tuple(out)


def _flat_buffers(groups: Sequence[Group], dp: int, alignment: int, partitioned: bool) -> list[Buffer]:
    buffers = []
    for g, group in enumerate(groups):
        names, numels = [n for n, _ in group], [k for _, k in group]
        if partitioned:
            fg = flat_group(numels, dp, alignment=alignment)
        else:
            fg = flat_group(numels, 1, alignment=1, tail_multiple=1)
        for rank in range(dp):
            start = rank * fg.partition_size if partitioned else 0
            buffers.append(Buffer(rank, g, g, fg.partition_size,
                                  _fragments_in(names, numels, fg.offsets, start, fg.partition_size)))
    return buffers


def zero3_partition_numel(numel: int, dp: int) -> int:
    """``ds_tensor`` length: ceil(numel / dp) (partition_parameters.py:1690-1697, 1816-1817)."""
    return -(-numel // dp)


def even_share(numel: int, rank: int, parts: int) -> tuple[int, int]:
    """Elements [lo, hi) of a ``numel``-element tensor that ``rank`` of ``parts`` holds when ZeRO-3
    partitions it; also the near-equal slice each of ``parts`` replicas writes once."""
    per = zero3_partition_numel(numel, parts)
    return min(rank * per, numel), min((rank + 1) * per, numel)


def zero3_sub_groups(numels: Sequence[int], dp: int, sub_group_size: int = DEFAULT_SUB_GROUP_SIZE) -> list[range]:
    """Split one group's parameter indices into sub-groups as stage3.py:1210-1231 does."""
    _check_positive(numels)
    parts = [zero3_partition_numel(n, dp) for n in numels]
    if sub_group_size is None or sub_group_size >= sum(parts):
        return [range(len(numels))]
    out, begin, acc = [], 0, 0
    for i, p in enumerate(parts):
        acc += p
        if acc >= sub_group_size or i == len(parts) - 1:
            out.append(range(begin, i + 1))
            begin, acc = i + 1, 0
    return out


def _zero3_buffers(groups: Sequence[Group], dp: int, sub_group_size: int) -> list[Buffer]:
    buffers, index = [], 0
    for g, group in enumerate(groups):
        for sub in zero3_sub_groups([k for _, k in group], dp, sub_group_size):
            params = [group[i] for i in sub]
            for rank in range(dp):
                frags, cur = [], 0
                for name, n in params:
                    ps = zero3_partition_numel(n, dp)
                    length = max(0, min(ps, n - rank * ps))
                    if length:
                        frags.append(Fragment(name, rank * ps, length, cur))
                    cur += ps
                buffers.append(Buffer(rank, index, g, cur, tuple(frags)))
            index += 1
    return buffers


def _per_param_buffers(groups: Sequence[Group], dp: int) -> list[Buffer]:
    buffers, index = [], 0
    for g, group in enumerate(groups):
        if not group:
            raise LayoutError(f"param group {g} is empty; drop empty groups as DeepSpeed does (engine.py:2348)")
        for name, n in group:
            frags = (Fragment(name, 0, n, 0),) if n else ()  # zero-element: indexed, holds nothing
            buffers.extend(Buffer(r, index, g, n, frags) for r in range(dp))
            index += 1
    return buffers


def plan_zero(groups: Sequence[Group], dp: int, kind: str, *, alignment: int = 1,
              sub_group_size: int = DEFAULT_SUB_GROUP_SIZE) -> ZeroLayout:
    """Every rank's buffers for ``groups`` (lists of (name, numel)) at data-parallel size ``dp``.
    ``alignment`` (elements, see ``param_alignment``) applies to ZERO_FLAT only."""
    if kind not in KINDS:
        raise LayoutError(f"unknown optimizer kind {kind!r}; use one of {KINDS}")
    if dp < 1:
        raise LayoutError(f"data-parallel size must be >= 1, got {dp}")
    names = [n for group in groups for n, _ in group]
    if len(set(names)) != len(names):
        raise LayoutError(f"a parameter appears twice in the param groups: "
                          f"{sorted({n for n in names if names.count(n) > 1})}")
    if kind == ZERO3:
        buffers = _zero3_buffers(groups, dp, sub_group_size)
    elif kind == PER_PARAM:
        buffers = _per_param_buffers(groups, dp)
    else:
        align = alignment if kind == ZERO_FLAT else 1
        buffers = _flat_buffers(groups, dp, align, partitioned=kind != FUSED_FLAT)
    return ZeroLayout(kind, dp, tuple(buffers), replicated=kind in (FUSED_FLAT, PER_PARAM))
