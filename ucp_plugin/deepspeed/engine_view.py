"""What a live DeepSpeed engine holds, in ``ucp_plugin.plan.zero`` terms, read from its optimizer.

``inspect_engine`` names the wrapper kind, recovers the param groups in flat order and plans this
layout's buffers, then checks the plan against the real buffer sizes, so a DeepSpeed release that
lays its buffers out differently fails loudly here instead of saving misplaced bytes.
Line references: docs/deepspeed-internals.md.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from ..errors import LayoutError, UnsupportedError
from ..format import dtype_name
from ..plan import zero as Z
from .params import ParamMap, param_map

_KIND_BY_CLASS = {"DeepSpeedZeroOptimizer": Z.ZERO_FLAT, "BF16_Optimizer": Z.BF16_FLAT,
                  "DeepSpeedZeroOptimizer_Stage3": Z.ZERO3}


@dataclass(frozen=True)
class EngineView:
    """``groups``: as the base optimizer holds them (zero.py's *group*); ``trainable``: parameters
    whose fp32 master and optimizer state live in the buffers; ``frozen``: every other parameter;
    ``buffers``: persistent module buffers. ``shapes`` covers all parameters. ``rank``/``dp`` are the
    coordinates in the group ZeRO partitions over (megatron's data-parallel group when the engine has
    an ``mpu``); ``params`` names each parameter's atom (``params.py``)."""
    kind: str
    rank: int
    dp: int
    stage: int
    param_dtype: str
    groups: tuple[tuple[tuple[str, int], ...], ...]
    shapes: dict
    layout: Z.ZeroLayout
    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    buffers: tuple[str, ...]
    params: ParamMap | None = None  # set by inspect_engine


def optimizer_kind(engine) -> str:
    name = type(engine.optimizer).__name__
    if name in _KIND_BY_CLASS:
        return _KIND_BY_CLASS[name]
    if engine.zero_optimization_stage() == 0 and isinstance(engine.optimizer, torch.optim.Optimizer) \
            and engine.get_data_types()[0] == torch.float32:
        return Z.PER_PARAM
    raise UnsupportedError(f"optimizer wrapper {name} (ZeRO stage {engine.zero_optimization_stage()}, "
                           f"dtype {engine.get_data_types()[0]}) is not supported by universal "
                           "checkpointing; use ZeRO-1/2/3 with bf16 or fp32, or stage 0 with fp32")


def _flat_order(engine, kind: str) -> list[list[torch.nn.Parameter]]:
    opt = engine.optimizer
    if kind == Z.ZERO_FLAT:
        return [list(g) for g in opt.round_robin_bit16_groups]  # the order the flat buffer uses
    if kind == Z.BF16_FLAT:
        return [list(g) for g in opt.bf16_groups]
    if kind == Z.ZERO3:
        groups: dict[int, list] = {}
        for sub_id, sub in enumerate(opt.fp16_groups):
            groups.setdefault(opt.sub_group_to_group_id[sub_id], []).extend(sub)
        return [groups[g] for g in sorted(groups)]
    return [list(g["params"]) for g in opt.param_groups]


def _numel(p) -> int:
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


def _shape(p) -> tuple[int, ...]:
    return tuple(p.ds_shape if hasattr(p, "ds_shape") else p.shape)


def persistent_buffers(module: torch.nn.Module) -> list[str]:
    """Buffer names that ``state_dict`` saves (as DeepSpeed's ``_get_buffer_names``, engine.py:5406)."""
    names = []
    for prefix, mod in module.named_modules():
        for name, buf in mod.named_buffers(recurse=False):
            if buf is not None and name not in mod._non_persistent_buffers_set:
                names.append(f"{prefix}.{name}" if prefix else name)
    return names


def inspect_engine(engine) -> EngineView:
    kind = optimizer_kind(engine)
    names = engine.param_names
    groups = tuple(tuple((names[p], _numel(p)) for p in g) for g in _flat_order(engine, kind))
    opt = engine.optimizer
    align = 1
    if kind == Z.ZERO_FLAT:
        size = torch.tensor([], dtype=opt.round_robin_bit16_groups[0][0].dtype).element_size()
        align = Z.param_alignment(size, opt.parameter_alignment)
    sub = getattr(opt, "sub_group_size", Z.DEFAULT_SUB_GROUP_SIZE)
    group = getattr(engine, "seq_data_parallel_group", None)  # the group ZeRO partitions over
    dp = dist.get_world_size(group) if dist.is_initialized() else 1
    layout = Z.plan_zero(groups, dp, kind, alignment=align, sub_group_size=sub)
    params = dict(engine.module.named_parameters())
    trainable = tuple(n for n, p in params.items() if p.requires_grad and _numel(p) > 0)
    view = EngineView(kind, dist.get_rank(group) if dist.is_initialized() else 0, dp,
                      engine.zero_optimization_stage(), dtype_name(engine.get_data_types()[0]), groups,
                      {n: _shape(p) for n, p in params.items()}, layout, trainable,
                      tuple(n for n in params if n not in trainable), tuple(persistent_buffers(engine.module)))
    _check_against_engine(engine, view)
    return replace(view, params=param_map(engine, view))


def fp32_buffers(engine, kind: str) -> list[torch.Tensor]:
    """This rank's fp32 master buffers, by buffer index (PER_PARAM: the parameters themselves)."""
    opt = engine.optimizer
    if kind == Z.ZERO_FLAT:
        return list(opt.single_partition_of_fp32_groups)
    if kind == Z.BF16_FLAT:
        return list(opt.fp32_groups_flat_partition)
    if kind == Z.ZERO3:
        return list(opt.fp32_partitioned_groups_flat)
    return [p for g in opt.param_groups for p in g["params"]]


def base_optimizer(engine, kind: str) -> torch.optim.Optimizer:
    return engine.optimizer if kind == Z.PER_PARAM else engine.optimizer.optimizer


def _check_against_engine(engine, view: EngineView) -> None:
    bufs = fp32_buffers(engine, view.kind)
    mine = view.layout.for_rank(view.rank)
    if len(bufs) != len(mine) or any(t.numel() != b.numel for t, b in zip(bufs, mine)):
        raise LayoutError(f"DeepSpeed's {view.kind} buffers on rank {view.rank} have sizes "
                          f"{[t.numel() for t in bufs]}, ucp_plugin.plan.zero predicts "
                          f"{[b.numel for b in mine]}: this DeepSpeed version lays out ZeRO buffers "
                          "differently; use a supported DeepSpeed (see setup.py)")
    if view.kind == Z.ZERO3:
        planned = [[f.name for f in b.fragments] for b in view.layout.for_rank(0)]
        actual = [[engine.param_names[p] for p in sub] for sub in engine.optimizer.fp16_groups]
        if actual != planned:  # rank 0 holds the first element of every parameter
            raise LayoutError(f"ZeRO-3 sub-groups {actual} differ from the planned {planned}")
