"""What one rank holds of a Megatron model, in the checkpoint language: for each local parameter its
global (atom) name, split, global shape and the region of the atom its local tensor is; or, for a
parameter made of several atoms' blocks (a ``Blocks`` split: megatron's legacy GroupedMLP), the
segments of its local tensor and the atom region each one is (``plan.segments``).

The family's ``ModelSpec`` comes from a ``ModelConfig``; for a model built elsewhere (Megatron-LM)
it is read off megatron's ``TransformerConfig`` (``infer_model_config``), except the unpadded vocabulary
size, which megatron never sees (it builds the embedding with the padded size): it comes from the
caller, from Megatron-LM's arguments / tokenizer, or, at load, from the checkpoint. Where none knows
it, the padded size stands for the vocabulary (``vocab_padding``: such a checkpoint loads wherever the
padded size is the same; a reshard to another padded size then asks for the true size).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from ..errors import SpecError, UnsupportedError
from ..format import Region
from ..language import (EXPERT, PIPELINE, Blocks, Fused, ModelSpec, Partitioned, Replicated, Split,
                        VocabPartitioned, is_expert)
from ..models import family_module
from ..models.config import ModelConfig
from ..plan import IDENTITY, TRANSPOSED, Segment, region_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParamEntry:
    """One local parameter of this rank. ``tp_rank``/``tp`` are the (expert-)tensor-parallel
    coordinates that split it; ``dp_rank``/``dp`` the data-parallel group that replicates it.
    A ``Blocks`` parameter is no atom itself: ``segments`` say which atoms its local tensor holds
    (``global_shape``/``region`` then describe the local tensor as a whole)."""
    local_name: str
    global_name: str
    split: Split
    tied_to: str | None
    global_shape: tuple[int, ...]
    region: Region
    tp_rank: int
    tp: int
    dp_rank: int
    dp: int
    expert: bool
    param: torch.nn.Parameter = field(compare=False, repr=False)
    segments: tuple[Segment, ...] = ()

    @property
    def atoms(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """(name, shape) of every atom this parameter is read from."""
        if self.segments:
            return tuple((s.atom, s.shape) for s in self.segments)
        return ((self.source, self.global_shape),)

    @property
    def local_shape(self) -> tuple[int, ...]:
        return shape_of(self.param)

    @property
    def source(self) -> str:
        """The atom this parameter is read from (a tied output layer reads the embedding's)."""
        return self.tied_to or self.global_name

    @property
    def real_numel(self) -> int:
        """Elements of the local tensor that belong to the atom: vocabulary padding rows (the last
        rows of a dim-0 region) are excluded, so they are never written."""
        if not self.region.pad or self.region.dim != 0:
            return math.prod(self.local_shape)
        rows = sum(e - s for s, e in self.region.intervals)
        return rows * math.prod(self.local_shape[1:])


def shape_of(param) -> tuple[int, ...]:
    """A local parameter's shape; DeepSpeed ZeRO-3 empties partitioned parameters and keeps their
    shape in ``ds_shape``."""
    return tuple(getattr(param, "ds_shape", param.shape))


def infer_family(tconfig) -> str:
    """gpt / llama / mixtral from megatron's TransformerConfig (pass ``family`` to be explicit)."""
    if getattr(tconfig, "num_moe_experts", None):
        return "mixtral"
    if tconfig.normalization == "RMSNorm" and tconfig.gated_linear_unit:
        return "llama"
    return "gpt"


def megatron_lm_vocab() -> tuple[int | None, int | None]:
    """(unpadded vocab size, make_vocab_size_divisible_by) from Megatron-LM, when it is running."""
    try:
        from megatron.training.global_vars import get_args, get_tokenizer
    except ImportError:
        return None, None
    try:
        args = get_args()
    except Exception:  # megatron.training importable but not initialised: not a Megatron-LM run
        return None, None
    vocab = getattr(args, "vocab_size", None)
    try:
        vocab = get_tokenizer().vocab_size
    except Exception:  # no tokenizer built (e.g. --vocab-size with a null tokenizer)
        pass
    return vocab, getattr(args, "make_vocab_size_divisible_by", None)


def infer_model_config(model, vocab: int | None = None, divisible_by: int | None = None) -> ModelConfig:
    """The ModelConfig of a megatron GPTModel (any chunk of it). Without a vocabulary size (argument or
    Megatron-LM), the padded size is the vocabulary; without ``divisible_by``, the one that pads
    ``vocab`` to the model's padded size at this TP (``padded // TP``: the same rows whatever the
    model was built with)."""
    from megatron.core import parallel_state as ps

    gpt = unwrap(model)
    c = gpt.config
    lm_vocab, lm_divisible = megatron_lm_vocab()
    vocab = vocab or lm_vocab or gpt.vocab_size
    if vocab > gpt.vocab_size:
        raise UnsupportedError(f"vocab={vocab} is more than this model's padded vocabulary "
                               f"({gpt.vocab_size} rows); pass the true vocabulary size")
    return ModelConfig(hidden=c.hidden_size, heads=c.num_attention_heads, ffn=c.ffn_hidden_size,
                       layers=c.num_layers, vocab=vocab, query_groups=c.num_query_groups,
                       divisible_by=divisible_by or lm_divisible
                       or gpt.vocab_size // ps.get_tensor_model_parallel_world_size(),
                       tied=bool(gpt.share_embeddings_and_output_weights),
                       experts=c.num_moe_experts or 0, topk=c.moe_router_topk,
                       moe_ffn=c.moe_ffn_hidden_size if c.num_moe_experts else None,
                       grouped_mlp=bool(c.moe_grouped_gemm), seq_length=gpt.max_sequence_length)


def resolve_spec(chunks: list, family: str | None, config: ModelConfig | None,
                 vocab: int | None = None) -> tuple[str, ModelConfig, ModelSpec]:
    tconfig = unwrap(chunks[0]).config
    family = family or infer_family(tconfig)
    config = config or infer_model_config(chunks[0], vocab)
    return family, config, family_module(family).spec(config)


def global_shape(name: str, split: Split, local_shape: tuple[int, ...], tp: int,
                 vocab: int) -> tuple[int, ...]:
    """The atom's shape, from a local tensor's shape and its split."""
    shape = list(local_shape)
    if isinstance(split, Replicated):
        return tuple(shape)
    if isinstance(split, (Partitioned, Fused)):
        shape[split.dim] *= tp
    elif isinstance(split, VocabPartitioned):
        shape[split.dim] = vocab
    else:
        raise UnsupportedError(f"parameter {name!r}: split kind {split.kind!r} is not supported by the "
                               "Megatron adapter")
    return tuple(shape)


def _groups(expert: bool) -> tuple[int, int, int, int]:
    """(tp_rank, tp, dp_rank, dp) of a dense or an expert parameter."""
    from megatron.core import parallel_state as ps

    if expert:
        return (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size(),
                ps.get_expert_data_parallel_rank(), ps.get_expert_data_parallel_world_size())
    return (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
            ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())


def param_entries(chunks: list, spec: ModelSpec, cfg: ModelConfig) -> list[ParamEntry]:
    """Every local parameter of every model chunk of this rank, checked against the spec."""
    entries = []
    for chunk in chunks:
        gpt = unwrap(chunk)
        offsets = name_offsets(gpt, cfg)
        for local, param in gpt.named_parameters():
            entries.append(_entry(spec, cfg, local, spec.to_global(local, offsets), param, offsets))
    return entries


@dataclass(frozen=True)
class BufferEntry:
    """One persistent buffer of this rank's model (megatron's MoE router ``expert_bias``, ...): every
    TP and DP rank of a stage holds the same values, so TP rank 0 of DP rank 0 writes it."""
    global_name: str
    writes: bool
    tensor: torch.Tensor = field(compare=False, repr=False)


def buffer_entries(chunks: list, spec: ModelSpec, cfg: ModelConfig) -> list[BufferEntry]:
    """The buffers ``state_dict`` saves (not the non-persistent ones, e.g. the router's token counts)
    of every model chunk of this rank, named globally as parameters are."""
    tp_rank, _, dp_rank, _ = _groups(False)
    entries = []
    for chunk in chunks:
        gpt = unwrap(chunk)
        offsets = name_offsets(gpt, cfg)
        for prefix, module in gpt.named_modules():
            for name, buf in module.named_buffers(recurse=False):
                if buf is not None and name not in module._non_persistent_buffers_set:
                    local = f"{prefix}.{name}" if prefix else name
                    entries.append(BufferEntry(spec.to_global(local, offsets), tp_rank == 0 and dp_rank == 0, buf))
    return entries


def _entry(spec: ModelSpec, cfg: ModelConfig, local: str, name: str, param, offsets: dict) -> ParamEntry:
    rule = spec.rule_for(name)
    expert = is_expert(name)
    tp_rank, tp, dp_rank, dp = _groups(expert)
    if isinstance(rule.split, Blocks):
        segments = block_segments(name, rule.split, shape_of(param), _local_experts(cfg),
                                  offsets.get(EXPERT, 0), tp_rank, tp)
        return ParamEntry(local, name, rule.split, None, shape_of(param), Region.whole(shape_of(param)),
                          tp_rank, tp, dp_rank, dp, expert, param, segments)
    shape = global_shape(name, rule.split, shape_of(param), tp, cfg.vocab)
    region = region_for(rule.split, shape, tp_rank, tp)
    if tuple(region.local_shape(shape)) != shape_of(param):
        raise SpecError(f"parameter {name!r}: the {spec.family} spec's split {rule.split} gives TP rank "
                        f"{tp_rank} of {tp} a {list(region.local_shape(shape))} tensor, megatron built "
                        f"{list(shape_of(param))}; fix the model spec (or the ModelConfig: vocab/divisible_by)")
    return ParamEntry(local, name, rule.split, rule.tied_to, shape, region, tp_rank, tp, dp_rank, dp,
                      expert, param)


def _local_experts(cfg: ModelConfig) -> int:
    from megatron.core import parallel_state as ps

    return (cfg.experts or 1) // ps.get_expert_model_parallel_world_size()


def block_segments(name: str, split: Blocks, shape: tuple[int, ...], count: int, first: int, tp_rank: int,
                   tp: int) -> tuple[Segment, ...]:
    """The segments of a ``Blocks`` parameter of local ``shape``: block k is atom ``first + k``'s
    TP-local region (its local tensor transposed when the split says so)."""
    rows, cols = split.block_shape(name, shape, count)
    local = (cols, rows) if split.transposed else (rows, cols)
    order = TRANSPOSED if split.transposed else IDENTITY
    segments = []
    for k in range(count):
        atom = split.atom_name(name, first + k)
        atom_shape = global_shape(atom, split.inner, local, tp, 0)
        region = region_for(split.inner, atom_shape, tp_rank, tp)
        if tuple(region.local_shape(atom_shape)) != local:
            raise SpecError(f"parameter {name!r}: block {k} should be the {list(local)} local tensor of "
                            f"{atom!r}, but {split.inner} gives TP rank {tp_rank} of {tp} "
                            f"{list(region.local_shape(atom_shape))}; fix the model spec's Blocks split")
        segments.append(Segment(atom, atom_shape, region, k * rows * cols, order))
    return tuple(segments)


def layers_per_stage(chunks: list) -> tuple[int, ...] | None:
    """Transformer layers on each pipeline stage (for the manifest)."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    config = unwrap(chunks[0]).config
    pp = ps.get_pipeline_model_parallel_world_size()
    if config.virtual_pipeline_model_parallel_size:
        return None  # interleaved stages: one count per stage does not describe it
    return tuple(get_num_layers_to_build(config, pp_rank=r) for r in range(pp))


def name_offsets(model, cfg: ModelConfig) -> dict[str, int]:
    """First global index of this rank's layers ("pp") and experts ("ep"), for ``ModelSpec.to_global``."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    # with virtual pipeline stages each model chunk knows its own vp_stage
    offsets = {PIPELINE: get_transformer_layer_offset(model.config, getattr(model, "vp_stage", None))}
    if cfg.experts:
        local_experts = cfg.experts // parallel_state.get_expert_model_parallel_world_size()
        offsets[EXPERT] = parallel_state.get_expert_model_parallel_rank() * local_experts
    return offsets


def as_chunks(model) -> list:
    """The model chunks (one per virtual pipeline stage) of a model or a list of them, as
    Megatron-LM passes them."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def unwrap(model):
    """The GPTModel inside megatron's DDP / Float16Module wrappers."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model
