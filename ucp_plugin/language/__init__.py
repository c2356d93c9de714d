"""The checkpoint language: typed splits and per-family specs. Imports only ``format``/``errors``."""
from .spec import (EXPERT, MAX_PARALLEL_SIZE, PIPELINE, ModelSpec, Placement, Rule, check_expert_grid,
                   check_experts, check_pipeline, check_split, is_expert, tensor_parallel_for)
from .splits import SPLITS, Blocks, Fused, Partitioned, Replicated, Split, VocabPartitioned, split_from_json

__all__ = ["EXPERT", "MAX_PARALLEL_SIZE", "PIPELINE", "ModelSpec", "Placement", "Rule", "check_expert_grid",
           "check_experts", "check_pipeline", "check_split", "is_expert", "tensor_parallel_for", "SPLITS", "Blocks", "Fused",
           "Partitioned", "Replicated", "Split", "VocabPartitioned", "split_from_json"]
