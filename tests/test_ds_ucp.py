"""DeepSpeed's own universal folders, both ways, on real engines (gloo, CPU).

In: plain DeepSpeed ZeRO-2 and ZeRO-3 checkpoints (DP2, saved after step 3 of 8) go through the real
``python -m deepspeed.checkpoint.ds_to_universal``; the plugin loads the folders on DP1 at the other
stage (with another init seed) and must reproduce the uninterrupted run's losses within 1e-5 relative.

Out: a plugin checkpoint (ZeRO-1 DP2) goes through ``ucp convert --to deepspeed``; stock DeepSpeed,
in fresh processes that never import ``ucp_plugin.deepspeed``, resumes it with
``"checkpoint": {"load_universal": true}`` at ZeRO-2 and ZeRO-3 on DP3, within 1e-5 relative. Stock
universal loading restores no buffer and no frozen parameter, so that model keeps its buffer constant
and the targets start from the source's init seed (their frozen parameter is the saved one).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.ds_harness import ds_config as C
from ucp_plugin.errors import FormatError
from ucp_plugin.testing.launcher import run_workers

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
U = ["ucp_plugin.deepspeed"]
STEPS, SAVE_AT, TOL = 8, 3, 1e-5
TAG = f"global_step{SAVE_AT}"
SOURCES = {"native_z2": C(2, "fp32", 2), "native_z3": C(3, "fp32", 2), "plugin_z1": C(1, "fp32", 2, universal=True)}
STATIC = {"moving_buffer": False}
MODELS = {"plugin_z1": STATIC}
IN = {  # target name: (source, target world size, config)
    "ds_universal_z2_dp2_to_plugin_z3_dp1": ("native_z2", 1, C(3, "fp32", 1, universal=True)),
    "ds_universal_z3_dp2_to_plugin_z1_dp1": ("native_z3", 1, C(1, "fp32", 1, universal=True)),
}


def _env() -> dict:
    return {"PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}


def _launch(world: int, runs: list[dict], log_dir) -> list[dict]:
    """Rank 0's result of each run."""
    ranks = run_workers(world, "tests.ds_harness:train_many", {"runs": runs}, timeout=900, env=_env(),
                        log_dir=str(log_dir))
    return list(ranks[0])


def ds_to_universal(ckpt: str, tag: str = TAG) -> str:
    """DeepSpeed's own converter, as a user runs it; returns the universal folder."""
    out = os.path.join(ckpt, f"{tag}_universal")
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                    os.path.join(ckpt, tag), "--output_folder", out, "--inject_missing_state"],
                   check=True, capture_output=True, env={**os.environ, **_env()}, timeout=600)
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds_ucp")
    runs = [dict(config=cfg, steps=STEPS, save_at=SAVE_AT, save_dir=str(root / n), imports=U,
                 model=MODELS.get(n)) for n, cfg in SOURCES.items()]
    results = _launch(2, runs, root / "log_src")
    out = {n: {"dir": str(root / n), "losses": r["losses"]} for n, r in zip(SOURCES, results)}
    for n in ("native_z2", "native_z3"):
        out[n]["universal"] = ds_to_universal(out[n]["dir"])
    return out


@pytest.fixture(scope="module")
def loaded(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("ds_ucp_in")
    runs = [dict(config=cfg, steps=STEPS - SAVE_AT, init_seed=1, imports=U, load_dir=sources[src]["dir"],
                 tag=f"{TAG}_universal") for src, _, cfg in IN.values()]
    return dict(zip(IN, _launch(1, runs, root / "log")))


@pytest.mark.parametrize("name", list(IN))
def test_plugin_resumes_from_ds_to_universal_folder(sources, loaded, name):
    ref = sources[IN[name][0]]["losses"][SAVE_AT:]
    got = loaded[name]
    assert got["start_step"] == SAVE_AT
    for a, b in zip(got["losses"], ref, strict=True):
        assert abs(a - b) <= TOL * abs(b), (name, got["losses"], ref)


def test_ds_universal_folder_missing_a_parameter_file(sources, tmp_path):
    from ucp_plugin.deepspeed.sources import open_source
    broken = tmp_path / "broken"
    shutil.copytree(sources["native_z2"]["universal"], broken)
    os.remove(broken / "zero" / "blocks.1.fc.weight" / "fp32.pt")
    with pytest.raises(FormatError, match=r"zero/blocks\.1\.fc\.weight/fp32\.pt: missing; parameter "
                                          r"'blocks\.1\.fc\.weight'") as e:
        open_source(str(broken))
    assert "\n" not in str(e.value)
    os.remove(broken / "zero" / "blocks.0.qkv.bias" / "exp_avg_sq.pt")
    with pytest.raises(FormatError, match=r"blocks\.0\.qkv\.bias/exp_avg_sq\.pt: missing; parameter "
                                          r"'blocks\.0\.qkv\.bias' lacks optimizer state"):
        open_source(str(broken))


def _stock(stage: int, dp: int) -> dict:
    cfg = C(stage, "fp32", dp)
    cfg["checkpoint"] = {"load_universal": True}
    return cfg


OUT = {"plugin_z1_dp2_to_stock_z2_dp3": _stock(2, 3), "plugin_z1_dp2_to_stock_z3_dp3": _stock(3, 3)}


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("ds_ucp_out")
    out = str(root / "ds")
    cli = subprocess.run([sys.executable, "-m", "ucp_plugin.cli.main", "convert",
                          os.path.join(sources["plugin_z1"]["dir"], TAG), out, "--to", "deepspeed"],
                         capture_output=True, text=True, env={**os.environ, **_env()}, timeout=600)
    assert cli.returncode == 0, cli.stderr
    runs = [dict(config=cfg, steps=STEPS - SAVE_AT, init_seed=0, load_dir=out, model=STATIC) for cfg in OUT.values()]
    return {"dir": out, "results": dict(zip(OUT, _launch(3, runs, root / "log")))}


@pytest.mark.parametrize("name", list(OUT))
def test_stock_deepspeed_resumes_converted_checkpoint(sources, converted, name):
    ref, got = sources["plugin_z1"]["losses"][SAVE_AT:], converted["results"][name]
    assert got["start_step"] == SAVE_AT
    for a, b in zip(got["losses"], ref, strict=True):
        assert abs(a - b) <= TOL * abs(b), (name, got["losses"], ref)


def test_converted_folder_holds_the_checkpoint_exactly(sources, converted):
    """The written folder read back by the DeepSpeed-universal source equals the plugin checkpoint."""
    import torch
    from ucp_plugin.deepspeed.sources import open_source
    ours, theirs = open_source(sources["plugin_z1"]["dir"]), open_source(converted["dir"], tag=TAG)
    assert set(ours.atoms) == set(theirs.atoms)
    for name, a in ours.atoms.items():
        b = theirs.atoms[name]
        assert (a.kind, a.shape, a.states, a.scalars) == (b.kind, b.shape, b.states, b.scalars), name
        for state in a.states:
            assert torch.equal(ours.read(name, state, 0, a.numel, torch.float32),
                               theirs.read(name, state, 0, b.numel, torch.float32)), (name, state)
    assert theirs.common_state()["engine"] == ours.common_state()["engine"]
