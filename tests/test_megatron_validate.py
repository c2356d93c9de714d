"""A target layout the checkpoint's model cannot have is refused from the manifest alone (nothing is
built, no tensor read), with the language's reason and the valid sizes of the whole model. The
manifests here hold megatron's parameter shapes and no tensors; test_megatron_checkpoint checks the
same refusal through the training harness's resume."""
import os
from dataclasses import asdict

import pytest

from ucp_plugin.errors import LayoutError, UnsupportedError
from ucp_plugin.format import MANIFEST, Atom, Layout, Manifest, Writer
from ucp_plugin.megatron.layout import MegatronLayout
from ucp_plugin.megatron.validate import valid_sizes, validate_layout
from ucp_plugin.models import ModelConfig
from ucp_plugin.testing.build import model_spec

SIZES = dict(hidden=32, heads=4, ffn=64, layers=4, vocab=100, divisible_by=32, seq_length=16)
MODELS = {"gpt": ModelConfig(**SIZES, tied=True),
          "llama": ModelConfig(**dict(SIZES, query_groups=2, ffn=48)),
          "mixtral": ModelConfig(**dict(SIZES, query_groups=2, ffn=48, experts=4, moe_ffn=40))}


def _mlp(prefix: str, ffn: int, hidden: int, glu: bool) -> dict:
    return {prefix + "linear_fc1.weight": ((2 if glu else 1) * ffn, hidden),
            prefix + "linear_fc2.weight": (hidden, ffn)}


def megatron_shapes(family: str, c: ModelConfig) -> dict:
    """The shapes megatron-core's GPTModel gives the parameters that TP splits."""
    shapes = {"embedding.word_embeddings.weight": (c.vocab, c.hidden)}
    for i in range(c.layers):
        layer = f"decoder.layers.{i}."
        shapes[layer + "input_layernorm.weight"] = (c.hidden,)
        shapes[layer + "self_attention.linear_qkv.weight"] = ((c.heads + 2 * c.groups) * c.head_dim, c.hidden)
        shapes[layer + "self_attention.linear_proj.weight"] = (c.hidden, c.hidden)
        if c.experts:
            shapes[layer + "mlp.router.weight"] = (c.experts, c.hidden)
            for e in range(c.experts):
                shapes.update(_mlp(f"{layer}mlp.experts.local_experts.{e}.", c.expert_ffn, c.hidden, True))
        else:
            shapes.update(_mlp(layer + "mlp.", c.ffn, c.hidden, family != "gpt"))
    if not c.tied:
        shapes["output_layer.weight"] = (c.vocab, c.hidden)
    return shapes


def manifest(family: str) -> Manifest:
    cfg = MODELS[family]
    spec, fp32 = model_spec(family, cfg), {"fp32": "float32"}
    atoms = tuple(Atom(name, "param", shape, spec.split_for(name).to_json(), fp32)
                  for name, shape in megatron_shapes(family, cfg).items())
    atoms += (Atom("embedding.word_embeddings.weight@vocab_padding", "param", (28, 32), {"kind": "replicated"},
                   fp32),)
    return Manifest(Writer("megatron.core", "1", "test"), Layout(tp=2), atoms, family=family,
                    model={"config": asdict(cfg)})


def _refused(family: str, **layout) -> str:
    with pytest.raises(LayoutError) as e:
        validate_layout(manifest(family), MegatronLayout(**layout))
    return str(e.value)


def test_tp_not_dividing_the_heads():
    msg = _refused("gpt", tp=3, dp=1)
    assert "this gpt model (layers=4, heads=4, query_groups=4" in msg and "cannot be loaded at TP=3" in msg
    assert "TP=3 does not divide its 4 groups" in msg and "TP in [1, 2, 4]" in msg


def test_tp_not_dividing_the_query_groups():
    msg = _refused("llama", tp=4)
    assert "heads=4, query_groups=2" in msg and "TP=4 does not divide its 2 groups" in msg
    assert "TP in [1, 2]" in msg


def test_ep_not_dividing_the_experts():
    msg = _refused("mixtral", dp=3, ep=3)
    assert "EP=3 does not divide the 4 experts of this mixtral model" in msg and "EP in [1, 2, 4]" in msg


def test_pp_larger_than_the_layers():
    msg = _refused("llama", pp=5)
    assert "PP=5 is larger than the 4 layers" in msg and "PP in [1, 2, 3, 4]" in msg


def test_megatron_rules_too():
    assert "set sp=True" in _refused("mixtral", tp=2)
    assert "first_stage_layers=4" in _refused("gpt", pp=2, first_stage_layers=4)


def test_valid_layouts_pass_and_sizes_are_the_whole_models():
    for family, layout in [("gpt", dict(tp=4, pp=4)), ("llama", dict(tp=2, pp=2, first_stage_layers=1)),
                           ("mixtral", dict(tp=2, sp=True, dp=4, ep=4))]:
        validate_layout(manifest(family), MegatronLayout(**layout))
    spec = model_spec("mixtral", MODELS["mixtral"])
    shapes = {a.name: a.shape for a in manifest("mixtral").atoms if "@" not in a.name}
    assert valid_sizes(spec, shapes) == {"TP": [1, 2], "PP": [1, 2, 3, 4], "EP": [1, 2, 4],
                                         "ETP": [1, 2, 4, 5, 8, 10, 20, 40]}


def test_etp_checks_the_experts_and_tp_the_rest():
    """moe_ffn=40 takes ETP 4 while the 2 query groups refuse TP 4; ETP 3 is refused naming ETP."""
    validate_layout(manifest("mixtral"), MegatronLayout(tp=2, sp=True, dp=4, ep=2, etp=4))
    validate_layout(manifest("mixtral"), Layout(tp=2, dp=2, ep=2, etp=1))
    msg = _refused("mixtral", dp=3, etp=3)
    assert "cannot be loaded at TP=1 PP=1 EP=1 ETP=3" in msg and "moe_ffn=40" in msg
    assert "fused part of size 40 is not divisible by ETP=3" in msg
    assert "ETP in [1, 2, 4, 5, 8, 10, 20, 40]" in msg


def test_etp_on_a_dense_model_is_refused():
    assert "ETP=1 needs a Mixture-of-Experts model" in _refused("llama", tp=2, etp=1)


def test_reads_only_the_manifest(tmp_path):
    """A folder with nothing but the manifest (no tensor files) is enough; the error names it."""
    with open(os.path.join(tmp_path, MANIFEST), "w") as f:
        f.write(manifest("llama").to_json())
    validate_layout(str(tmp_path), Layout(tp=2, pp=4))
    with pytest.raises(LayoutError, match=f"^{tmp_path}: this llama model"):
        validate_layout(str(tmp_path), Layout(tp=4))


def test_a_manifest_without_the_model_needs_a_spec():
    m = manifest("gpt")
    bare = Manifest(m.writer, m.layout, m.atoms)
    with pytest.raises(UnsupportedError, match="pass spec="):
        validate_layout(bare, Layout(tp=3))
    with pytest.raises(LayoutError, match="TP=3 does not divide"):
        validate_layout(bare, Layout(tp=3), spec=model_spec("gpt", MODELS["gpt"]))
