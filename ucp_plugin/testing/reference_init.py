"""Identical initial weights at every layout, for tests that compare runs across layouts.

Every rank builds the whole model once at TP=PP=EP=1 with a fixed seed (megatron's own CPU
initialisation, so the values are the distributions megatron uses), then copies its own shard of each
parameter into its stage model using megatron's partition attributes (``partition_dim``,
``partition_stride``, exactly as ``_initialize_affine_weight_cpu`` slices a master weight) -- not our
checkpoint language, so the language is tested against an independent reference. Expert parameters
are sliced by megatron's expert-tensor-parallel rank and size (ETP may differ from TP).

Vocabulary padding rows are set to zero at every layout: megatron pads to ``divisible_by * TP`` rows,
so the padding differs between layouts, and it would otherwise hold layout-dependent random values.
(Padded rows still enter the softmax: runs compare exactly only when the padded sizes agree.)

A GroupedMLP model (``grouped_mlp=True``) gets the SequentialMLP reference's expert weights, laid out
the way GroupedMLP's forward reads them (``grouped_shard``), so both expert layouts start from the
same model and their losses can be compared.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..errors import StateMismatchError
from ..language import ModelSpec, is_expert
from ..megatron.layout import MegatronLayout
from ..models.config import ModelConfig
from .build import build_stage_model, global_named_parameters, init_parallel_state


def full_reference_state(family: str, cfg: ModelConfig, seed: int, **overrides) -> dict[str, torch.Tensor]:
    """The TP=PP=EP=1 parameters (global names), vocab rows cut to ``cfg.vocab``. Leaves megatron's
    parallel_state initialised for TP=PP=1 (re-initialise for the target layout afterwards).
    ``overrides`` are TransformerConfig fields, as for the stage model."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    single = MegatronLayout(dp=dist.get_world_size())
    init_parallel_state(single)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    # GroupedMLP initialises its tensors in another order: build the SequentialMLP (grouped_shard)
    model = build_stage_model(family, replace(cfg, grouped_mlp=False), single, **overrides)
    state = {}
    for name, param in model.named_parameters():
        value = param.detach().clone()
        if getattr(param, "is_embedding_or_output_parameter", False):
            value = value[: cfg.vocab]
        state[name] = value
    return state


def megatron_shard(full: torch.Tensor, dim: int, stride: int, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s slice as megatron lays it out: ``full`` cut into ``world * stride`` equal
    chunks along ``dim``; the rank holds chunks rank, rank + world, ... (stride 2: [gate_r; up_r])."""
    per_chunk = full.shape[dim] // (world * stride)
    chunks = torch.split(full, per_chunk, dim=dim)
    return torch.cat(chunks[rank::world], dim=dim)


def _tp_rank_world(global_name: str) -> tuple[int, int]:
    """The (rank, size) of the tensor-parallel group that splits ``global_name``: megatron's expert
    TP group (ETP ranks, TP unless the layout sets ``etp``) for an expert parameter, TP otherwise."""
    from megatron.core import parallel_state as ps

    if is_expert(global_name):
        return ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def _pad_rows(value: torch.Tensor, rows: int) -> torch.Tensor:
    padded = value.new_zeros((rows, *value.shape[1:]))
    padded[: value.shape[0]] = value
    return padded


def local_shard(global_name: str, param: torch.nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    """This rank's slice of the TP=1 value ``full``: expert parameters by the expert-TP rank/size."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    rank, world = _tp_rank_world(global_name)
    dim = param.partition_dim
    if getattr(param, "is_embedding_or_output_parameter", False):
        full = _pad_rows(full, param.shape[dim] * world)
    return megatron_shard(full, dim, param.partition_stride, rank, world)


GROUPED = {"weight1": "linear_fc1.weight", "weight2": "linear_fc2.weight"}


def grouped_shard(global_name: str, param: torch.nn.Parameter, state: dict, glu: bool) -> torch.Tensor:
    """GroupedMLP's ``weight1``/``weight2`` of this rank from the SequentialMLP reference experts, as
    megatron's GroupedMLP forward reads them: local expert k (global ep_rank * E + k) is block k of
    the flat tensor; weight1's block is [hidden, 2*ffn/TP] = (this TP rank's [gate_r; up_r] rows of
    the expert's fc1).T (the forward chunks its output columns into gate | up), weight2's block is
    [ffn/TP, hidden] = (this TP rank's columns of the expert's fc2).T."""
    from megatron.core import parallel_state as ps

    module, which = global_name.rsplit(".", 1)
    rank, world = _tp_rank_world(global_name)
    count = ps.get_expert_model_parallel_world_size()
    experts = sum(1 for n in state if n.startswith(f"{module}.local_experts.") and n.endswith(GROUPED[which]))
    first = ps.get_expert_model_parallel_rank() * (experts // count)
    blocks = []
    for k in range(experts // count):
        full = state[f"{module}.local_experts.{first + k}.{GROUPED[which]}"]
        if which == "weight1":
            blocks.append(megatron_shard(full, 0, 2 if glu else 1, rank, world).t().reshape(-1))
        else:
            blocks.append(megatron_shard(full, 1, 1, rank, world).t().reshape(-1))
    return torch.cat(blocks).view(param.shape)


@torch.no_grad()
def copy_reference_shards(model, state: dict[str, torch.Tensor], spec: ModelSpec, cfg: ModelConfig) -> int:
    """Copy this rank's shard of ``state`` into ``model`` (before wrapping it in DDP); returns the
    number of parameters set. A tied output layer reads the word embedding's value."""
    count = 0
    for global_name, param in global_named_parameters(model, spec, cfg):
        source = spec.rule_for(global_name).tied_to or global_name
        if global_name.rsplit(".", 1)[-1] in GROUPED and source not in state:
            param.copy_(grouped_shard(global_name, param, state, model.config.gated_linear_unit))
            count += 1
            continue
        if source not in state:
            raise StateMismatchError(f"parameter {global_name!r} (read from {source!r}) is not in the "
                                     "TP=PP=EP=1 reference model; the model spec and the stage model "
                                     "disagree")
        shard = local_shard(global_name, param, state[source])
        if tuple(shard.shape) != tuple(param.shape):
            raise StateMismatchError(f"parameter {global_name!r}: reference shard {list(shard.shape)} vs "
                                     f"local {list(param.shape)}; check the layout's vocab padding / splits")
        param.copy_(shard)
        count += 1
    return count
