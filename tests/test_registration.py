"""Extension points a user reaches from their own code, without editing ucp_plugin: a model family
(here a LLaMA with qk-norm, declared in this test module), a kind of checkpoint folder, a DeepSpeed
adapter binding. One process, no tensors: the family is checked through the same manifest-only
layout validation, planner and Megatron-LM flags a real save/load goes through."""
import argparse
import os
from dataclasses import asdict, replace

import pytest

from test_megatron_validate import megatron_shapes
from ucp_plugin.errors import FormatError, LayoutError
from ucp_plugin.format import Atom, Layout, Manifest, Writer
from ucp_plugin.language import Replicated, Rule
from ucp_plugin.megatron.layout import MegatronLayout
from ucp_plugin.megatron.validate import validate_layout
from ucp_plugin.models import FAMILIES, ModelConfig, family_module, llama, register_family
from ucp_plugin.plan import region_for

NAME = "llama_qknorm"
CFG = ModelConfig(hidden=32, heads=4, ffn=48, layers=2, vocab=100, query_groups=2, divisible_by=32, seq_length=16)


class QkNormLlama:
    """LLaMA whose attention normalises queries and keys per head (megatron-core's ``qk_layernorm``:
    ``self_attention.{q,k}_layernorm.weight`` of shape [head_dim], the same on every TP rank)."""
    ARCH = replace(llama.ARCH, family=NAME)

    @staticmethod
    def spec(config=None, **sizes):
        base = llama.spec(config, **sizes)
        qk = Rule(r"decoder\.layers\.\d+\.self_attention\.(q|k)_layernorm\.weight", Replicated())
        return replace(base, family=NAME, rules=base.rules + (qk,))


@pytest.fixture
def qknorm(monkeypatch):
    """The family registered for one test (the registry is restored afterwards)."""
    monkeypatch.setattr(FAMILIES, "_families", dict(FAMILIES._families))
    register_family(NAME, QkNormLlama)
    return QkNormLlama


def _manifest(cfg: ModelConfig) -> Manifest:
    spec = family_module(NAME).spec(cfg)
    shapes = megatron_shapes("llama", cfg)
    for i in range(cfg.layers):
        for q in "qk":
            shapes[f"decoder.layers.{i}.self_attention.{q}_layernorm.weight"] = (cfg.head_dim,)
    atoms = tuple(Atom(name, "param", shape, spec.split_for(name).to_json(), {"fp32": "float32"})
                  for name, shape in shapes.items())
    return Manifest(Writer("megatron.core", "1", "test"), Layout(tp=2), atoms, family=NAME,
                    model={"config": asdict(cfg)})


def test_a_family_registered_from_outside_validates_and_plans(qknorm):
    assert family_module(NAME) is qknorm and NAME in FAMILIES
    spec = family_module(NAME).spec(CFG)
    qk = "decoder.layers.1.self_attention.k_layernorm.weight"
    assert spec.split_for(qk) == Replicated()
    assert region_for(spec.split_for(qk), (CFG.head_dim,), 1, 2).intervals == ((0, CFG.head_dim),)
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert region_for(spec.split_for(qkv), (64, 32), 1, 2) != region_for(spec.split_for(qkv), (64, 32), 0, 2)
    manifest = _manifest(CFG)
    validate_layout(manifest, MegatronLayout(tp=2, pp=2))  # the recorded name finds the family
    with pytest.raises(LayoutError, match="TP=4 does not divide its 2 groups"):
        validate_layout(manifest, MegatronLayout(tp=4))


def test_megatron_lm_flags_offer_registered_families(qknorm):
    from ucp_plugin.integrations.megatron_lm.flags import UcpOptions, add_ucp_args

    parser = add_ucp_args(argparse.ArgumentParser(), check_patched=False)
    args = parser.parse_args(["--universal-checkpoint", "--universal-model-family", NAME])
    assert UcpOptions.from_args(args).family == NAME


def test_a_taken_family_name_is_refused(qknorm):
    register_family(NAME, QkNormLlama)  # the same family again: nothing changes
    with pytest.raises(ValueError, match="already registered"):
        register_family("llama", QkNormLlama)
    with pytest.raises(ValueError, match="no spec"):
        register_family("nameless", object())
    with pytest.raises(ValueError, match="unknown model family 'other'"):
        family_module("other")


def test_a_checkpoint_source_registered_from_outside_is_asked(monkeypatch, tmp_path):
    from ucp_plugin.deepspeed import sources

    monkeypatch.setattr(sources, "_SOURCES", dict(sources._SOURCES))
    mine = sources.SourceKind("mine", lambda folder: os.path.isfile(os.path.join(folder, "MINE")),
                              lambda folder, verify: ("mine", folder), "a folder of mine (MINE)")
    sources.register_source(mine)
    (tmp_path / "MINE").write_text("")
    assert sources.open_source(str(tmp_path)) == ("mine", str(tmp_path))
    with pytest.raises(ValueError, match="'mine' is already registered"):
        sources.register_source(mine)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(FormatError):  # a folder no kind claims
        sources.open_source(str(other))


def test_a_second_binding_of_a_class_raises():
    from ucp_plugin.deepspeed.params import register_binding
    from ucp_plugin.integrations.megatron_deepspeed import MegatronBinding

    with pytest.raises(ValueError, match="MegatronBinding is already registered"):
        register_binding(MegatronBinding())
