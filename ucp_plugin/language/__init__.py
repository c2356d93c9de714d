"""The checkpoint language: typed splits and per-family specs. Imports only ``format``/``errors``."""
from .spec import EXPERT, PIPELINE, ModelSpec, Placement, Rule, check_experts, check_pipeline
from .splits import SPLITS, Blocks, Fused, Partitioned, Replicated, Split, VocabPartitioned, split_from_json

__all__ = ["EXPERT", "PIPELINE", "ModelSpec", "Placement", "Rule", "check_experts", "check_pipeline", "SPLITS", "Blocks", "Fused",
           "Partitioned", "Replicated", "Split", "VocabPartitioned", "split_from_json"]
