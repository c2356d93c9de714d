"""Build megatron-core's ``GPTModel`` for one pipeline stage of a layout, from a family
(``ucp_plugin.models.<family>``: its ``ARCH`` and ``spec``) and a ``ModelConfig``, with the local
(non-Transformer-Engine) layer spec; and name a rank's parameters globally.

Needs megatron's ``parallel_state`` initialised for the layout (``init_parallel_state`` below). On a
CPU-only machine install ``cpu_shim`` first.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..errors import LayoutError
from ..language import ModelSpec, VocabPartitioned, is_expert
from ..megatron.layout import MegatronLayout
from ..megatron.model_view import name_offsets, unwrap
from ..models import family_module
from ..models.config import Architecture, ModelConfig


def model_spec(family: str, cfg: ModelConfig) -> ModelSpec:
    return family_module(family).spec(cfg)


def transformer_config(arch: Architecture, cfg: ModelConfig, layout: MegatronLayout, **overrides):
    """A fp32, dropout-free TransformerConfig with every fusion that needs CUDA/apex/TE turned off."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=cfg.layers, hidden_size=cfg.hidden, num_attention_heads=cfg.heads,
        num_query_groups=cfg.groups, ffn_hidden_size=cfg.ffn,
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.expert_tp,
        sequence_parallel=layout.sp,
        num_layers_in_first_pipeline_stage=layout.first_stage_layers,
        num_layers_in_last_pipeline_stage=layout.last_stage_layers,
        pipeline_dtype=torch.float32, params_dtype=torch.float32,
        use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
        normalization=arch.norm, gated_linear_unit=arch.glu, add_bias_linear=arch.bias,
        activation_func=torch.nn.functional.gelu if arch.activation == "gelu" else torch.nn.functional.silu,
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        gradient_accumulation_fusion=False, apply_rope_fusion=False, persist_layer_norm=False)
    if arch.moe:
        kwargs.update(num_moe_experts=cfg.experts, moe_router_topk=cfg.topk,
                      moe_ffn_hidden_size=cfg.expert_ffn, moe_token_dispatcher_type="alltoall",
                      moe_grouped_gemm=cfg.grouped_mlp, moe_permute_fusion=False)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


class SequenceParallelNorm:
    """A torch LayerNorm/RMSNorm usable with sequence parallelism. Megatron's ``WrappedTorchNorm``
    refuses SP because, with the sequence split over TP, each TP rank sees a part of the tokens and
    the norm's gradient must be summed over TP; megatron's ``finalize_model_grads`` does that for
    parameters marked ``sequence_parallel`` (as apex/TE norms mark theirs), so this norm marks them."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        norm_cls = torch.nn.LayerNorm if config.normalization == "LayerNorm" else torch.nn.RMSNorm
        norm = norm_cls(hidden_size, eps=eps)
        for param in norm.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)
        return norm


def layer_spec(arch: Architecture, cfg: ModelConfig, config):
    """The local layer spec; with sequence parallelism, a block spec whose norms are
    ``SequenceParallelNorm`` (same parameter names and shapes as the stock spec)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(num_experts=cfg.experts or None, moe_grouped_gemm=cfg.grouped_mlp,
                                    normalization=arch.norm)
    if not config.sequence_parallel:
        return spec
    from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                             get_num_layers_to_build)

    submodules = replace(spec.submodules, input_layernorm=SequenceParallelNorm,
                         pre_mlp_layernorm=SequenceParallelNorm)
    spec = replace(spec, submodules=submodules)
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config),
                                      layer_norm=SequenceParallelNorm)


def build_stage_model(family: str, cfg: ModelConfig, layout: MegatronLayout, **config_overrides):
    """This rank's GPTModel (its pipeline stage, TP shard and experts)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_model import GPTModel

    arch = family_module(family).ARCH
    layout.check_model(cfg.layers, cfg.experts)
    config = transformer_config(arch, cfg, layout, **config_overrides)
    model = GPTModel(config=config, transformer_layer_spec=layer_spec(arch, cfg, config),
                     vocab_size=VocabPartitioned(0, cfg.divisible_by).padded_size(cfg.vocab, layout.tp), max_sequence_length=cfg.seq_length,
                     pre_process=parallel_state.is_pipeline_first_stage(),
                     post_process=parallel_state.is_pipeline_last_stage(),
                     share_embeddings_and_output_weights=cfg.tied, position_embedding_type=arch.position)
    if layout.ep == 1 and layout.expert_tp != layout.tp:
        mark_expert_data_parallel(model)
    return model


def mark_expert_data_parallel(model) -> int:
    """Mark every expert parameter ``allreduce=False`` (megatron's flag for "reduce my gradient over
    the expert data-parallel group"); returns how many.

    megatron-core 0.16 sets the flag only when EP > 1 (``tensor_parallel/layers.py``,
    ``transformer/moe/experts.py``: ``allreduce = not (is_expert and expert_parallel)``). With EP = 1
    and ETP != TP the expert DP group is not the dense DP group: with ETP < TP it also spans the TP
    ranks that hold the same whole expert and, under sequence parallelism, see other tokens. Left
    unmarked, megatron DDP reduces those gradients over the dense DP group only, the TP ranks' copies
    of an expert drift apart and training differs from every other layout. Marked, the experts take
    the path they take at EP > 1 (expert DP grad buffers, the expert optimizer)."""
    count = 0
    for name, param in model.named_parameters():
        if is_expert(name):
            param.allreduce = False
            count += 1
    return count


def global_named_parameters(model, spec: ModelSpec, cfg: ModelConfig):
    """(global name, parameter) for this rank's parameters."""
    offsets = name_offsets(unwrap(model), cfg)
    return [(spec.to_global(name, offsets), param) for name, param in unwrap(model).named_parameters()]


def init_parallel_state(layout: MegatronLayout) -> None:
    """Initialise (or re-initialise) megatron's process groups for ``layout`` on an initialised
    default process group of exactly ``layout.world_size`` ranks."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        raise LayoutError("torch.distributed is not initialised; call torch.distributed.init_process_group "
                          "(e.g. through ucp_plugin.testing.launcher.run_workers) first")
    if dist.get_world_size() != layout.world_size:
        raise LayoutError(f"layout {layout.describe()} needs {layout.world_size} ranks "
                          f"(tp*pp*dp), the job has {dist.get_world_size()}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    # gloo is already the default backend here: megatron's extra gloo copies of the groups would only
    # cost rendezvous time
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.expert_tp,
        create_gloo_process_groups=False)
