"""Megatron universal checkpoints: save at one layout after 2 steps, load at another into a model with
different initial weights, train on; the resumed losses equal the uninterrupted run's within 1e-5
relative (measured: 0 to 5e-8). Also: the manifest's atoms, `ucp verify`, weights-only saves and
a wrong-model load."""
import os

import pytest

from ucp_plugin.launcher import WorkerError, run_workers
from ucp_plugin.megatron.layout import MegatronLayout
from ucp_plugin.storage import Checkpoint
from ucp_plugin.tools.verify import verify

pytestmark = pytest.mark.slow
TOL = 1e-5
SIZES = dict(hidden=32, heads=4, ffn=64, layers=4, vocab=100, divisible_by=32, seq_length=16)
MODELS = {"gpt": dict(SIZES, tied=True),
          "llama": dict(SIZES, query_groups=2, ffn=48),
          "mixtral": dict(SIZES, query_groups=2, ffn=48, experts=4, moe_ffn=40)}
SETTINGS = dict(steps=4, global_batch=4, lr=1e-2)
SAVE_AFTER = 2


@pytest.fixture(autouse=True)
def _path(monkeypatch):
    here = os.path.dirname(__file__)
    monkeypatch.setenv("PYTHONPATH", here + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _save(family, layout, root, optimizer=True):
    kwargs = dict(family=family, model=MODELS[family], layout=layout, settings=SETTINGS, root=str(root),
                  save_after=SAVE_AFTER, optimizer=optimizer)
    return run_workers(MegatronLayout(**layout).world_size, "mg_workers:save_and_continue", kwargs,
                       timeout=600)[0]


def _load(family, layout, root, optimizer=True, model=None):
    kwargs = dict(family=family, model=model or MODELS[family], layout=layout, settings=SETTINGS,
                  root=str(root), optimizer=optimizer)
    return run_workers(MegatronLayout(**layout).world_size, "mg_workers:load_and_continue", kwargs,
                       timeout=600)


def _rel(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


@pytest.mark.parametrize("family,source,target", [
    ("gpt", {"tp": 2}, {}),
    ("gpt", {"pp": 2}, {"tp": 2}),
    ("gpt", {"dp": 2, "optimizer": "ddp"}, {"tp": 2, "pp": 2}),
    ("llama", {"tp": 2, "sp": True}, {"pp": 2, "first_stage_layers": 1, "optimizer": "ddp"}),
    ("mixtral", {"dp": 2, "ep": 2}, {"tp": 2, "sp": True}),
    ("mixtral", {"tp": 2, "sp": True}, {"pp": 2, "dp": 2, "ep": 2}),
])
def test_resume_at_another_layout_matches_uninterrupted(tmp_path, family, source, target):
    saved = _save(family, source, tmp_path)
    resumed = _load(family, target, tmp_path)
    assert all(r["losses"] == resumed[0]["losses"] for r in resumed)
    assert resumed[0]["iteration"] == SAVE_AFTER and resumed[0]["extra"] == {"note": "test"}
    rel = _rel(resumed[0]["losses"], saved["losses"][SAVE_AFTER:])
    assert rel < TOL, f"{source} -> {target}: relative loss difference {rel:.2e}"


def test_manifest_atoms_and_verify(tmp_path):
    saved = _save("gpt", {"tp": 2}, tmp_path)
    assert verify(saved["path"]) == []
    m = Checkpoint.open(saved["path"]).manifest
    atoms = {a.name: a for a in m.atoms}
    assert (m.layout.tp, m.layout.zero_stage, m.family, m.iteration) == (2, 1, "gpt", SAVE_AFTER)
    emb = atoms["embedding.word_embeddings.weight"]
    assert emb.shape == (100, 32) and emb.split["kind"] == "vocab_partitioned"
    assert set(emb.states) == {"fp32", "exp_avg", "exp_avg_sq"} and emb.scalars == {"step": SAVE_AFTER}
    # megatron pads 100 -> 128 rows; the trained padding rows are kept beside the real ones
    assert atoms["embedding.word_embeddings.weight@vocab_padding"].shape == (28, 32)
    assert "output_layer.weight" not in atoms  # tied: the embedding's atom
    qkv = atoms["decoder.layers.3.self_attention.linear_qkv.weight"]
    assert qkv.shape == (96, 32) and {p.region.intervals for p in qkv.pieces if p.state == "fp32"} == \
        {((0, 48),), ((48, 96),)}


def test_weights_only_checkpoint_resumes_the_forward(tmp_path):
    saved = _save("llama", {"tp": 2, "sp": True}, tmp_path, optimizer=False)
    m = Checkpoint.open(saved["path"]).manifest
    assert all(set(a.states) == {"fp32"} for a in m.atoms)
    resumed = _load("llama", {"pp": 2}, tmp_path)[0]
    # same weights: the first resumed loss matches; the optimizer then starts afresh
    assert _rel(resumed["losses"][:1], saved["losses"][SAVE_AFTER:SAVE_AFTER + 1]) < TOL


def test_loading_another_model_names_the_missing_parameters(tmp_path):
    _save("gpt", {}, tmp_path)
    with pytest.raises(WorkerError, match="checkpoint lacks"):
        _load("llama", {}, tmp_path)
    with pytest.raises(WorkerError, match="shape mismatch"):
        _load("gpt", {}, tmp_path, model=dict(MODELS["gpt"], ffn=32))


def test_bf16_resume_uses_the_fp32_masters(tmp_path):
    """bf16 parameters, fp32 masters: the same layout resumes bit-exactly; another layout (and the
    other optimizer kind) within bf16's layout-to-layout rounding."""
    settings = dict(SETTINGS, bf16=True)
    kwargs = dict(family="gpt", model=MODELS["gpt"], settings=settings, root=str(tmp_path))
    saved = run_workers(2, "mg_workers:save_and_continue",
                        dict(kwargs, layout={"tp": 2}, save_after=SAVE_AFTER), timeout=600)[0]
    same = run_workers(2, "mg_workers:load_and_continue", dict(kwargs, layout={"tp": 2}), timeout=600)[0]
    other = run_workers(2, "mg_workers:load_and_continue", dict(kwargs, layout={"dp": 2, "optimizer": "ddp"}),
                        timeout=600)[0]
    assert same["losses"] == saved["losses"][SAVE_AFTER:]
    assert _rel(other["losses"], saved["losses"][SAVE_AFTER:]) < 1e-4
