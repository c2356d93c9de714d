"""The checkpoint language: exact matching, placements, validation messages, JSON round trip."""
import pytest

from ucp_plugin.errors import FormatError, LayoutError, SpecError
from ucp_plugin.language import (EXPERT, PIPELINE, Fused, ModelSpec, Partitioned, Placement, Replicated, Rule,
                                 VocabPartitioned, check_expert_grid, split_from_json, tensor_parallel_for)

SPEC = ModelSpec("toy", (
    Rule(r"embedding\.word_embeddings\.weight", VocabPartitioned(0, 8)),
    Rule(r"decoder\.layers\.\d+\.mlp\.experts\.local_experts\.\d+\.linear_fc1\.weight", Fused(0, num_parts=2)),
    Rule(r"decoder\.layers\.\d+\.(input_layernorm|mlp\.router)\.weight", Replicated()),
    Rule(r"decoder\.layers\.\d+\..*bias", Replicated()),
    Rule(r"decoder\.layers\.0\.input_layernorm\.bias", Replicated("average")),
    Rule(r"output_layer\.weight", VocabPartitioned(0, 8), tied_to="embedding.word_embeddings.weight"),
), (Placement(r"decoder\.layers\.(\d+)\.", PIPELINE), Placement(r"local_experts\.(\d+)\.", EXPERT)),
    num_layers=4, num_experts=8)


def test_every_parameter_matches_exactly_one_rule():
    assert SPEC.rule_for("output_layer.weight").tied_to == "embedding.word_embeddings.weight"
    with pytest.raises(SpecError, match=r"parameter 'decoder.layers.1.self_attention.linear_qkv.weight' "
                                        r"matches no rule of the 'toy'.*add a rule"):
        SPEC.check_names(["embedding.word_embeddings.weight", "decoder.layers.1.self_attention.linear_qkv.weight"])
    with pytest.raises(SpecError, match=r"'decoder.layers.0.input_layernorm.bias' matches 2 rules"):
        SPEC.rule_for("decoder.layers.0.input_layernorm.bias")


def test_placements_map_local_to_global_and_back():
    local = "decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight"
    glob = SPEC.to_global(local, {PIPELINE: 2, EXPERT: 4})
    assert glob == "decoder.layers.3.mlp.experts.local_experts.4.linear_fc1.weight"
    assert SPEC.to_local(glob, {PIPELINE: 2, EXPERT: 4}) == local
    assert SPEC.to_global("embedding.word_embeddings.weight", {PIPELINE: 2}) == "embedding.word_embeddings.weight"


def test_layout_checks_name_the_reason_and_valid_choices():
    with pytest.raises(LayoutError, match=r"PP=5 is larger than the 4 layers.*valid PP sizes: 1..4"):
        SPEC.check_layout(1, 5, 1, {})
    with pytest.raises(LayoutError, match=r"EP=3 does not divide the 8 experts.*valid EP sizes: \[1, 2, 4, 8\]"):
        SPEC.check_layout(1, 1, 3, {})
    with pytest.raises(LayoutError, match=r"fused part of size 6 is not divisible by TP=4"):
        SPEC.check_layout(4, 1, 1, {"decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight": (12, 4)})
    SPEC.check_layout(3, 1, 1, {"embedding.word_embeddings.weight": (37, 4)})  # vocab padding: any TP
    Partitioned(1).check("linear_fc2.weight", (4, 8), 2)  # no groups: only the dim must divide


def test_expert_parameters_are_checked_against_etp():
    """With an expert-tensor-parallel size, expert parameters are split by ETP and named so in the
    message; everything else (the router too) by TP."""
    fc1 = {"decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight": (12, 4)}
    SPEC.check_layout(4, 1, 1, fc1, etp=2)  # TP=4 would not divide the 6-row parts; ETP=2 does
    with pytest.raises(LayoutError, match=r"fused part of size 6 is not divisible by ETP=4; "
                                          r"valid ETP sizes: \[1, 2, 3, 6\]"):
        SPEC.check_layout(1, 1, 1, fc1, etp=4)
    assert tensor_parallel_for("decoder.layers.0.mlp.router.weight", 2, 1) == ("TP", 2)
    assert tensor_parallel_for("decoder.layers.0.mlp.shared_experts.linear_fc1.weight", 2, 1) == ("TP", 2)
    assert tensor_parallel_for("decoder.layers.0.mlp.experts.weight1", 2, 1) == ("ETP", 1)
    assert tensor_parallel_for("decoder.layers.0.mlp.experts.weight1", 2, None) == ("TP", 2)


def test_expert_grid_follows_megatron():
    """ETP x EP must divide TP x DP (megatron: world % (ETP*EP*PP) == 0); with ETP = TP: EP | DP."""
    check_expert_grid(tp=2, dp=1, ep=2, etp=1)  # TP2 with ETP1 makes room for EP2 on 2 ranks
    with pytest.raises(LayoutError, match=r"EP=2 must divide DP=1.*set ETP \(etp\) to one of \[1\]"):
        check_expert_grid(tp=2, dp=1, ep=2)
    with pytest.raises(LayoutError, match=r"ETP=4 x EP=2 must divide TP x DP = 4.*valid ETP at EP=2: \[1, 2\]"):
        check_expert_grid(tp=2, dp=2, ep=2, etp=4)


def test_splits_validate_and_round_trip():
    for split in (Replicated("check"), Partitioned(1, 4), VocabPartitioned(0, 64), Fused(0, (6, 2))):
        assert split_from_json(split.to_json()) == split
    with pytest.raises(ValueError, match="reduce must be"):
        Replicated("sum")
    with pytest.raises(FormatError, match="unknown split kind 'diagonal'.*newer ucp_plugin"):
        split_from_json({"kind": "diagonal"})
    with pytest.raises(ValueError, match="exactly one group"):
        Placement(r"layers\.\d+", PIPELINE)
