"""Hugging Face export (and import) against real transformers models and megatron-core's forward.

For each family a tiny megatron-core model trains 2 steps (TP=PP=1, fp32) and saves a universal
checkpoint; ``export_hf`` writes it as a transformers folder; ``AutoModelForCausalLM.from_pretrained``
must give megatron's logits on the same tokens within 1e-5 relative (fp32).
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from ucp_plugin.errors import UnsupportedError
from ucp_plugin.testing.launcher import run_workers

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5
BASE = dict(hidden=32, heads=4, ffn=48, layers=2, vocab=100, divisible_by=32, seq_length=16)
MODELS = {  # family: (ModelConfig sizes, HF class)
    "gpt": (dict(BASE, tied=True), "GPT2LMHeadModel"),
    "llama": (dict(BASE, query_groups=2), "LlamaForCausalLM"),
    "mixtral": (dict(BASE, query_groups=2, ffn=24, experts=4, topk=2), "MixtralForCausalLM"),
}


def _env() -> dict:
    return {"PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    runs = [dict(family=f, model=m, root=str(root / f), steps=2) for f, (m, _) in MODELS.items()]
    [results] = run_workers(1, "tests.hf_workers:train_save_logits", {"runs": runs}, timeout=900, env=_env(),
                            log_dir=str(root / "log"))
    return {f: {**r, "logits": torch.tensor(r["logits"])} for f, r in zip(MODELS, results)}


def hf_logits(folder: str, vocab: int, seq: int) -> torch.Tensor:
    from tests.hf_workers import probe_tokens
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(probe_tokens(vocab, seq)).logits.float(), model


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    from ucp_plugin.tools.hf_export import export_hf
    root = tmp_path_factory.mktemp("hf_out")
    return {f: export_hf(trained[f]["path"], str(root / f)) for f in MODELS}


@pytest.mark.parametrize("family", list(MODELS))
def test_export_matches_megatron_logits(trained, exported, family):
    sizes, cls = MODELS[family]
    out = exported[family]
    got, model = hf_logits(out, sizes["vocab"], sizes["seq_length"])
    assert type(model).__name__ == cls
    ref = trained[family]["logits"][..., :sizes["vocab"]]  # megatron's padded vocabulary rows dropped
    assert got.shape == ref.shape
    assert rel_err(got, ref) <= TOL, (family, rel_err(got, ref))


def test_export_sharded_bf16(trained, tmp_path):
    """Past max_shard_size: several files and an index; bfloat16 weights."""
    from ucp_plugin.tools.hf_export import export_hf
    sizes, _ = MODELS["mixtral"]
    out = export_hf(trained["mixtral"]["path"], str(tmp_path / "hf"), dtype="bfloat16", max_shard_size=40_000)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) >= 2
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    got, _ = hf_logits(out, sizes["vocab"], sizes["seq_length"])
    assert rel_err(got, trained["mixtral"]["logits"][..., :sizes["vocab"]]) <= 2e-2


def test_export_unknown_family_is_one_line_error(trained, tmp_path):
    from ucp_plugin.tools.hf_export import export_hf
    bad = tmp_path / "ck"
    shutil.copytree(trained["llama"]["path"], bad)
    manifest = json.load(open(bad / "ucp.json"))
    for family, match in (("t5", "model family 't5' has no Hugging Face mapping"),
                          (None, "the model family is unknown")):
        manifest["family"] = family
        (bad / "ucp.json").write_text(json.dumps(manifest))
        with pytest.raises(UnsupportedError, match=match) as e:
            export_hf(str(bad), str(tmp_path / f"out-{family}"))
        assert "\n" not in str(e.value)
    from ucp_plugin.cli.main import main
    assert main(["export", str(bad), str(tmp_path / "cli"), "--to", "hf"]) == 2  # the CLI: one line, exit 2


IMPORT_LAYOUTS = {"gpt": dict(tp=2), "llama": dict(tp=2), "mixtral": dict(dp=2, ep=2)}
PP2 = ("gpt", "llama")  # also loaded on a 2-stage pipeline (GPT: the tied output layer on the last stage)


@pytest.fixture(scope="module")
def imported(exported, tmp_path_factory):
    """Each export imported back; megatron loads it at TP2 (GPT, LLaMA) or EP2 (Mixtral) on 2 ranks, and
    (same launch) GPT and LLaMA at PP2."""
    from ucp_plugin.tools.hf_import import import_hf
    root = tmp_path_factory.mktemp("hf_in")
    paths = {f: import_hf(exported[f], str(root / f), f) for f in MODELS}
    runs = [dict(family=f, model=MODELS[f][0], layout=IMPORT_LAYOUTS[f], path=paths[f]) for f in MODELS]
    runs += [dict(family=f, model=MODELS[f][0], layout=dict(pp=2), path=paths[f]) for f in PP2]
    ranks = run_workers(2, "tests.hf_workers:load_logits", {"runs": runs}, timeout=900, env=_env(),
                        log_dir=str(root / "log"))
    logits = [torch.tensor(r["logits"]) for r in ranks[0]]
    return {**{f: {"path": paths[f], "logits": t} for f, t in zip(MODELS, logits)},
            **{f"{f}_pp2": {"path": paths[f], "logits": t} for f, t in zip(PP2, logits[len(MODELS):])}}


@pytest.mark.parametrize("family", list(MODELS))
def test_import_loads_in_megatron_on_another_layout(trained, imported, family):
    vocab = MODELS[family][0]["vocab"]
    got, ref = imported[family]["logits"][..., :vocab], trained[family]["logits"][..., :vocab]
    assert rel_err(got, ref) <= TOL, (family, IMPORT_LAYOUTS[family], rel_err(got, ref))


@pytest.mark.parametrize("family", PP2)
def test_import_at_pp2_matches_transformers(exported, imported, family):
    """An HF folder imported and loaded on a 2-stage pipeline: the stages' forward, one after another,
    gives the logits transformers computes from the same folder."""
    sizes = MODELS[family][0]
    ref, _ = hf_logits(exported[family], sizes["vocab"], sizes["seq_length"])
    got = imported[f"{family}_pp2"]["logits"][..., :sizes["vocab"]]
    assert got.shape == ref.shape
    assert rel_err(got, ref) <= TOL, (family, rel_err(got, ref))


@pytest.mark.parametrize("family", list(MODELS))
def test_export_import_export_is_bitwise(exported, imported, family, tmp_path):
    from safetensors.torch import load_file

    from ucp_plugin.tools.hf_export import export_hf
    from ucp_plugin.tools.verify import verify
    assert verify(imported[family]["path"]) == []
    again = export_hf(imported[family]["path"], str(tmp_path / "again"))
    first, second = (load_file(os.path.join(d, "model.safetensors")) for d in (exported[family], again))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert json.load(open(os.path.join(again, "config.json"))) == json.load(open(os.path.join(exported[family],
                                                                                             "config.json")))


def test_import_refuses_another_family(exported, tmp_path):
    from ucp_plugin.errors import FormatError
    from ucp_plugin.tools.hf_import import import_hf
    with pytest.raises(FormatError, match=r"config\.json: model_type 'llama' does not match family 'gpt' "
                                          r"\(expects 'gpt2'\); use --family llama") as e:
        import_hf(exported["llama"], str(tmp_path / "x"), "gpt")
    assert "\n" not in str(e.value)
    with pytest.raises(FormatError, match="model_type 'mixtral' does not match family 'llama'"):
        import_hf(exported["mixtral"], str(tmp_path / "y"), "llama")
