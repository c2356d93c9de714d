"""Every parameter of megatron-core's GPTModel (local layer spec, TP=1, one gloo rank) matches exactly
one rule of its family's checkpoint language, and each rule's split agrees with megatron's own
partition attributes (``tensor_model_parallel``, ``partition_dim``, ``partition_stride``)."""
import os

import pytest

from ucp_plugin.errors import LayoutError
from ucp_plugin.language import Blocks, Fused, Replicated, VocabPartitioned
from ucp_plugin.models import ModelConfig, gpt, llama, mixtral
from ucp_plugin.testing.launcher import run_workers

SIZES = dict(hidden=32, heads=4, ffn=64, layers=2, vocab=100, divisible_by=16, seq_length=16)
MODELS = {
    "gpt": ("gpt", dict(SIZES, tied=True)),
    "gpt_untied": ("gpt", dict(SIZES, tied=False)),
    "llama": ("llama", dict(SIZES, query_groups=2, ffn=48)),
    "mixtral": ("mixtral", dict(SIZES, query_groups=2, ffn=48, experts=4, moe_ffn=40)),
    "mixtral_grouped": ("mixtral", dict(SIZES, query_groups=2, ffn=48, experts=4, moe_ffn=40, grouped_mlp=True)),
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
    if isinstance(split, Blocks):  # GroupedMLP: each block is the transposed TP-local tensor
        assert split.transposed and param["partition_dim"] == 1 - split.inner.dim, f"{name}: {split}"
        return
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
@pytest.mark.parametrize("label", ["gpt", "gpt_untied", "llama", "mixtral", "mixtral_grouped"])
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
    # only TE names, the output layer (tied: exists only on the last stage of PP>1), GPT's position
    # embedding variants and the other expert layout may be absent from a local-spec TP=1 model
    other_experts = r"local_experts\." if label == "mixtral_grouped" else r"mlp\.experts\.weight"
    for pattern in unused:
        te_only = "layer_norm_" in pattern or "weight\\d+" in pattern
        assert te_only or pattern == r"output_layer\.weight" or other_experts in pattern, pattern


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
def test_grouped_mlp_blocks_are_the_sequential_atoms(megatron_params):
    """GroupedMLP's weight1/weight2 (all 4 experts in one tensor each) map block by block onto the
    SequentialMLP's per-expert atoms, with the shapes megatron gives those."""
    from ucp_plugin.megatron.model_view import block_segments

    grouped = {p["name"]: p for p in megatron_params["mixtral_grouped"]}
    sequential = {p["name"]: p for p in megatron_params["mixtral"]}
    spec = _spec("mixtral_grouped")
    for name, shape in [("decoder.layers.1.mlp.experts.weight1", [32, 4 * 2 * 40]),
                        ("decoder.layers.1.mlp.experts.weight2", [4 * 40, 32])]:
        assert grouped[name]["shape"] == shape
        segments = block_segments(name, spec.split_for(name), tuple(shape), 4, 0, 0, 1)
        assert [s.offset for s in segments] == [k * 32 * 80 // (1 if name.endswith("1") else 2) for k in range(4)]
        for k, seg in enumerate(segments):
            assert seg.atom == name.replace(f"weight{name[-1]}", f"local_experts.{k}.linear_fc{name[-1]}.weight")
            assert list(seg.shape) == sequential[seg.atom]["shape"] and seg.order == "transposed"
            assert spec.split_for(seg.atom) == spec.split_for(name).inner


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
