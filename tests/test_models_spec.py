"""Every parameter of megatron-core's GPTModel (local layer spec, TP=1, one gloo rank) matches exactly
one rule of its family's checkpoint language, and each rule's split agrees with megatron's own
partition attributes (``tensor_model_parallel``, ``partition_dim``, ``partition_stride``)."""
import os

import pytest

from ucp_plugin.errors import LayoutError, UnsupportedError
from ucp_plugin.language import Fused, Replicated, VocabPartitioned
from ucp_plugin.launcher import run_workers
from ucp_plugin.models import ModelConfig, gpt, llama, mixtral

SIZES = dict(hidden=32, heads=4, ffn=64, layers=2, vocab=100, divisible_by=16, seq_length=16)
MODELS = {
    "gpt": ("gpt", dict(SIZES, tied=True)),
    "gpt_untied": ("gpt", dict(SIZES, tied=False)),
    "llama": ("llama", dict(SIZES, query_groups=2, ffn=48)),
    "mixtral": ("mixtral", dict(SIZES, query_groups=2, ffn=48, experts=4, moe_ffn=40)),
    "mixtral_grouped": ("mixtral", dict(SIZES, query_groups=2, ffn=48, experts=4, grouped_mlp=True)),
}
FAMILY = {"gpt": gpt, "llama": llama, "mixtral": mixtral}


@pytest.fixture(scope="module")
def megatron_params():
    env = {"PYTHONPATH": os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return run_workers(1, "mg_workers:megatron_parameters", {"models": MODELS}, timeout=300, env=env)[0]


def _spec(label):
    family, sizes = MODELS[label]
    return FAMILY[family].spec(ModelConfig(**sizes))


def _check_split_against_megatron(param, split):
    name = param["name"]
    if not param.get("tensor_model_parallel", False):
        assert isinstance(split, Replicated), f"{name}: megatron replicates it, spec says {split}"
        return
    assert not isinstance(split, Replicated), f"{name}: megatron partitions it, spec says replicated"
    assert split.dim == param["partition_dim"], f"{name}: partition_dim {param['partition_dim']} vs {split}"
    stride = param["partition_stride"]
    if isinstance(split, Fused):
        parts = split.part_sizes(param["shape"][split.dim])
        assert len(parts) == stride, f"{name}: stride {stride} vs {split}"
    else:
        assert stride == 1, f"{name}: megatron stride {stride} but spec {split}"
    is_vocab = bool(param.get("is_embedding_or_output_parameter"))
    assert is_vocab == isinstance(split, VocabPartitioned), f"{name}: vocab-parallel mismatch ({split})"


@pytest.mark.slow
@pytest.mark.parametrize("label", ["gpt", "gpt_untied", "llama", "mixtral"])
def test_every_parameter_matches_one_rule_consistent_with_megatron(megatron_params, label):
    spec = _spec(label)
    params = megatron_params[label]
    assert params, "megatron built no parameters"
    used = set()
    for param in params:
        rule = spec.rule_for(param["name"])  # raises SpecError when unmatched or ambiguous
        used.add(rule.pattern)
        _check_split_against_megatron(param, rule.split)
        spec.split_for(param["name"]).check(param["name"], tuple(param["shape"]), 1)
    unused = [r.pattern for r in spec.rules if r.pattern not in used]
    # only TE names, the output layer (tied: exists only on the last stage of PP>1) and GPT's
    # position embedding variants may be absent from a local-spec TP=1 model
    for pattern in unused:
        te_only = "layer_norm_" in pattern or "weight\\d+" in pattern
        assert te_only or pattern == r"output_layer\.weight", pattern


@pytest.mark.slow
def test_param_names_per_family(megatron_params):
    names = {label: {p["name"] for p in ps} for label, ps in megatron_params.items()}
    assert "output_layer.weight" not in names["gpt"]  # tied at PP=1: the embedding is reused
    assert "output_layer.weight" in names["gpt_untied"] | names["llama"]
    assert "embedding.position_embeddings.weight" in names["gpt"]
    assert not any(n.endswith(".bias") for n in names["llama"] | names["mixtral"])
    assert "decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight" in names["mixtral"]
    assert "decoder.layers.0.mlp.router.weight" in names["mixtral"]
    grouped = {"decoder.layers.0.mlp.experts.weight1", "decoder.layers.0.mlp.experts.weight2"}
    assert grouped <= names["mixtral_grouped"]


@pytest.mark.slow
def test_grouped_mlp_layout_is_reported_not_guessed(megatron_params):
    grouped = {p["name"]: p for p in megatron_params["mixtral_grouped"]}
    w1, w2 = grouped["decoder.layers.0.mlp.experts.weight1"], grouped["decoder.layers.0.mlp.experts.weight2"]
    # all 4 experts of the rank in one tensor each: [hidden, experts * 2*ffn] and [experts * ffn, hidden]
    assert w1["shape"] == [32, 4 * 2 * 48] and w2["shape"] == [4 * 48, 32]
    with pytest.raises(UnsupportedError, match="GroupedMLP"):
        _spec("mixtral_grouped")


def test_spec_placements_map_local_to_global():
    spec = mixtral.spec(hidden=32, heads=4, query_groups=2, ffn=48, layers=4, vocab=100, experts=4)
    local = "decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight"
    glob = "decoder.layers.3.mlp.experts.local_experts.2.linear_fc1.weight"
    assert spec.to_global(local, {"pp": 2, "ep": 2}) == glob
    assert spec.to_local(spec.to_global(local, {"pp": 2, "ep": 2}), {"pp": 2, "ep": 2}) == local
    te = "decoder.layers.0.mlp.experts.linear_fc2.weight1"
    assert spec.to_global(te, {"pp": 1, "ep": 2}) == "decoder.layers.1.mlp.experts.linear_fc2.weight3"


def test_layout_checks_name_the_valid_choices():
    spec = llama.spec(hidden=32, heads=4, query_groups=2, ffn=48, layers=2, vocab=100)
    shapes = {"decoder.layers.0.self_attention.linear_qkv.weight": (64, 32)}
    spec.check_layout(2, 1, 1, shapes)
    with pytest.raises(LayoutError, match="query groups"):
        spec.check_layout(4, 1, 1, shapes)
    fc1 = {"decoder.layers.0.mlp.linear_fc1.weight": (96, 32)}
    spec.check_layout(4, 1, 1, fc1)
    with pytest.raises(LayoutError, match="fused part"):
        spec.check_layout(5, 1, 1, fc1)


def test_family_guards():
    with pytest.raises(ValueError, match="mixtral"):
        llama.spec(hidden=32, heads=4, ffn=48, layers=2, vocab=100, experts=4)
    with pytest.raises(ValueError, match="experts"):
        mixtral.spec(hidden=32, heads=4, ffn=48, layers=2, vocab=100)
    with pytest.raises(TypeError):
        gpt.spec(ModelConfig(**SIZES), hidden=8)
