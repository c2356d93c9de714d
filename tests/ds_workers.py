"""Worker functions run by ``ucp_plugin.testing.launcher.run_workers`` in DeepSpeed test processes (no pytest).

``geometry`` builds one DeepSpeed engine per named config on the current process group and checks
``ucp_plugin.plan.zero`` against what DeepSpeed really holds: the *values* of every predicted fragment
in the fp32 buffers (the model is filled with distinct random numbers first, so a fragment in the
wrong place cannot match by chance), zeros in the padding, DeepSpeed's own offset bookkeeping, and the
length and state-dict index of every optimizer state after one step. It returns mismatch messages.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from tests import ds_harness as H
from ucp_plugin.deepspeed.engine_view import fp32_buffers
from ucp_plugin.plan import zero as Z

GEOMETRY_CONFIGS = {
    # name: (ds_config args, ds_config kwargs, split param groups, model overrides)
    "stage0_fp32": ((0, "fp32"), {}, False, {}),
    "zero1_fp32": ((1, "fp32"), {}, False, {}),
    "zero2_fp32_split": ((2, "fp32"), {}, True, {}),
    "zero2_fp32_align_tied": ((2, "fp32"), {"parameter_alignment": True}, False, {"tied": True}),
    "zero1_bf16": ((1, "bf16"), {}, False, {}),
    "zero1_bf16_fp32acc": ((1, "bf16"), {"grad_accum_dtype": "fp32"}, True, {}),
    "zero2_bf16_align": ((2, "bf16"), {"parameter_alignment": True}, False, {}),
    "zero3_fp32": ((3, "fp32"), {}, False, {}),
    "zero3_fp32_subgroups_split": ((3, "fp32"), {"sub_group_size": 300}, True, {}),
    "zero3_bf16_tied": ((3, "bf16"), {}, False, {"tied": True}),
}
OPTIMIZER_CLASSES = {"DeepSpeedZeroOptimizer": Z.ZERO_FLAT, "BF16_Optimizer": Z.BF16_FLAT,
                     "DeepSpeedZeroOptimizer_Stage3": Z.ZERO3, "AdamW": Z.PER_PARAM}


def expected_groups(net, split: bool, wrapped: bool = True) -> list[list[tuple[str, int]]]:
    """(name, numel) per group as the base optimizer holds them, from the model alone (no DeepSpeed):
    wrappers keep only optimized parameters; stage 0 fp32 (no wrapper) keeps frozen ones too."""
    names = {id(p): n for n, p in net.named_parameters()}
    groups = H.param_groups(net, split)
    groups = [g["params"] for g in groups] if split else [groups]
    keep = (lambda p: p.requires_grad and p.numel() > 0) if wrapped else (lambda p: True)
    return [[(names[id(p)], p.numel()) for p in g if keep(p)] for g in groups]


def _fill_distinct(net, seed: int = 1234) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) + 3.0)  # never zero: padding stays detectable
    return {n: p.detach().clone().flatten() for n, p in net.named_parameters()}


def plan_for(name: str, dp: int, groups) -> Z.ZeroLayout:
    (stage, dtype), kw, _, _ = GEOMETRY_CONFIGS[name]
    kind = Z.optimizer_kind(stage, dtype, kw.get("grad_accum_dtype"))
    align = Z.param_alignment(2 if dtype == "bf16" else 4, kw.get("parameter_alignment", False))
    sub = kw.get("sub_group_size", Z.DEFAULT_SUB_GROUP_SIZE)
    return Z.plan_zero(groups, dp, kind, alignment=align, sub_group_size=sub)


def check_values(layout: Z.ZeroLayout, rank: int, buffers, ref, dtype) -> list[str]:
    errors, mine = [], layout.for_rank(rank)
    if len(mine) != len(buffers):
        return [f"rank {rank}: {len(mine)} predicted buffers, DeepSpeed has {len(buffers)}"]
    for b, t in zip(mine, buffers):
        flat = t.detach().float().flatten()
        if flat.numel() != b.numel:
            errors.append(f"rank {rank} buffer {b.index}: predicted numel {b.numel}, DeepSpeed {flat.numel()}")
            continue
        covered = torch.zeros(b.numel, dtype=torch.bool)
        for f in b.fragments:
            want = ref[f.name][f.param_offset:f.param_offset + f.length].to(dtype).float()
            if not torch.equal(flat[f.buffer_offset:f.buffer_offset + f.length], want):
                errors.append(f"rank {rank} buffer {b.index}: values of {f} differ")
            covered[f.buffer_offset:f.buffer_offset + f.length] = True
        if layout.kind != Z.ZERO3 and flat[~covered].abs().sum() != 0:  # ZeRO-3 pads with torch.empty
            errors.append(f"rank {rank} buffer {b.index}: padding is not zero")
    return errors


def check_bookkeeping(engine, layout: Z.ZeroLayout, rank: int, groups, alignment: int) -> list[str]:
    """Compare with DeepSpeed's own offsets: flat offsets/paddings, _param_slice_mappings, ds_tensor."""
    opt, errors, kind = engine.optimizer, [], layout.kind
    if kind in (Z.ZERO_FLAT, Z.BF16_FLAT):
        for b in layout.for_rank(rank):
            got = {n: (a.start, a.numel) for n, a in opt._param_slice_mappings[b.group].items()}
            want = {f.name: (f.buffer_offset, f.length) for f in b.fragments}
            if got != want:
                errors.append(f"rank {rank} group {b.group}: _param_slice_mappings {got} != {want}")
    if kind == Z.ZERO_FLAT:
        for g, group in enumerate(groups):
            fg = Z.flat_group([n for _, n in group], layout.dp, alignment=alignment)
            got = (tuple(opt.round_robin_bit16_offsets[g]), tuple(opt.round_robin_bit16_padding[g]))
            if got != (fg.offsets, fg.paddings):
                errors.append(f"group {g}: DeepSpeed offsets/paddings {got} != {(fg.offsets, fg.paddings)}")
    if kind == Z.ZERO3:
        names = [[engine.param_names[p] for p in sub] for sub in opt.fp16_groups]
        want = [[f.name for f in b.fragments] for b in layout.for_rank(0)]
        if names != want:
            errors.append(f"ZeRO-3 sub-groups {names} != predicted {want}")
        for p in engine.module.parameters():
            if p.ds_tensor.numel() != Z.zero3_partition_numel(p.ds_numel, layout.dp):
                errors.append(f"{engine.param_names[p]}: ds_tensor numel {p.ds_tensor.numel()}")
    return errors


def base_state(engine, kind: str) -> dict:
    sd = engine.optimizer.state_dict()
    if kind == Z.PER_PARAM:
        return sd["state"]
    return sd["optimizer_state_dict" if kind == Z.ZERO3 else "base_optimizer_state"]["state"]


def check_states(engine, layout: Z.ZeroLayout, rank: int) -> list[str]:
    errors, state = [], base_state(engine, layout.kind)
    frozen = {n for n, p in engine.module.named_parameters() if not p.requires_grad}
    buffers = [b for b in layout.for_rank(rank) if not {f.name for f in b.fragments} <= frozen]
    for b in buffers:
        entry = state.get(b.index)
        if entry is None or not {"exp_avg", "exp_avg_sq", "step"} <= set(entry):
            errors.append(f"rank {rank}: no AdamW state at index {b.index} (keys {sorted(state)})")
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            if entry[key].numel() != b.numel:
                errors.append(f"rank {rank} index {b.index}: {key} numel {entry[key].numel()} != {b.numel}")
    if len(state) != len(buffers):
        errors.append(f"rank {rank}: {len(state)} state entries for {len(buffers)} trainable buffers")
    return errors


def check_config(name: str) -> dict:
    (stage, dtype), kw, split, model = GEOMETRY_CONFIGS[name]
    rank, dp = dist.get_rank(), dist.get_world_size()
    net = H.build_model(0, **model)
    ref = _fill_distinct(net)
    groups = expected_groups(net, split, wrapped=(stage, dtype) != (0, "fp32"))
    layout = plan_for(name, dp, groups)
    engine = H.make_engine(H.ds_config(stage, dtype, dp, **kw), net, split)
    kind = OPTIMIZER_CLASSES.get(type(engine.optimizer).__name__, type(engine.optimizer).__name__)
    if kind != layout.kind:
        return {"config": name, "errors": [f"DeepSpeed built {kind}, plan says {layout.kind}"]}
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    alignment = Z.param_alignment(2 if dtype == "bf16" else 4, kw.get("parameter_alignment", False))
    errors = check_values(layout, rank, fp32_buffers(engine, kind), ref, torch_dtype)
    errors += check_bookkeeping(engine, layout, rank, groups, alignment)
    wrong = Z.plan_zero(groups, dp + 1, layout.kind, sub_group_size=kw.get("sub_group_size", Z.DEFAULT_SUB_GROUP_SIZE))
    wrong = Z.ZeroLayout(wrong.kind, dp, tuple(b for b in wrong.buffers if b.rank < dp), wrong.replicated)
    detects = bool(check_values(wrong, rank, fp32_buffers(engine, kind), ref, torch_dtype)) or layout.replicated
    H.run_steps(engine, 1, seed=0, model=model)
    errors += check_states(engine, layout, rank)
    engine.destroy()
    return {"config": name, "kind": kind, "errors": errors, "detects_wrong_plan": detects}


def geometry(names: list[str]) -> list[dict]:
    """Worker: check every named config on this process group, one engine at a time."""
    H.init_deepspeed()
    return [check_config(name) for name in names]
