"""Worker functions for the Megatron tests, run in fresh processes by ``ucp_plugin.launcher``
(the CPU shim is process-global, so it never enters the pytest process)."""
from __future__ import annotations

import os
import warnings

warnings.filterwarnings("ignore")  # megatron warns about missing apex/TE at every import

ATTRS = ("tensor_model_parallel", "partition_dim", "partition_stride", "is_embedding_or_output_parameter",
         "allreduce", "sequence_parallel", "shared", "shared_embedding")


def _init_single_rank():
    import torch.distributed as dist

    from ucp_plugin.megatron import cpu_shim
    from ucp_plugin.megatron.layout import MegatronLayout, init_parallel_state

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    cpu_shim.install()
    init_parallel_state(MegatronLayout())


def _describe(model) -> list[dict]:
    return [{"name": n, "shape": list(p.shape), **{a: getattr(p, a) for a in ATTRS if hasattr(p, a)}}
            for n, p in model.named_parameters()]


def _allow_grouped_gemm_construction():
    """GroupedMLP asserts the CUDA-only grouped_gemm package at construction; the spec test only
    needs its parameter names and attributes, so the assertion is lifted (no forward is run)."""
    from megatron.core.transformer.moe import grouped_gemm_util

    grouped_gemm_util.assert_grouped_gemm_is_available = lambda: None


def megatron_parameters(models: dict) -> dict:
    """{label: [param description]} for GPTModels built at TP=PP=EP=1 from {label: (family, sizes)}."""
    from ucp_plugin.megatron.build import build_stage_model
    from ucp_plugin.megatron.layout import MegatronLayout
    from ucp_plugin.models import ModelConfig

    _init_single_rank()
    _allow_grouped_gemm_construction()
    out = {}
    for label, (family, sizes) in models.items():
        model = build_stage_model(family, ModelConfig(**sizes), MegatronLayout())
        out[label] = _describe(model)
    return out
