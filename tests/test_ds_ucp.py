"""DeepSpeed's own universal folders, both ways, on real engines (gloo, CPU).

In: plain DeepSpeed ZeRO-2 and ZeRO-3 checkpoints (DP2, saved after step 3 of 8) go through the real
``python -m deepspeed.checkpoint.ds_to_universal``; the plugin loads the folders on DP3 at the other
stage (with another init seed) and must reproduce the uninterrupted run's losses within 1e-5 relative.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.ds_harness import ds_config as C
from ucp_plugin.errors import FormatError
from ucp_plugin.launcher import run_workers

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
U = ["ucp_plugin.deepspeed"]
STEPS, SAVE_AT, TOL = 8, 3, 1e-5
TAG = f"global_step{SAVE_AT}"
SOURCES = {"native_z2": C(2, "fp32", 2), "native_z3": C(3, "fp32", 2)}
IN = {  # target name: (source, target world size, config)
    "ds_universal_z2_dp2_to_plugin_z3_dp3": ("native_z2", 3, C(3, "fp32", 3, universal=True)),
    "ds_universal_z3_dp2_to_plugin_z1_dp3": ("native_z3", 3, C(1, "fp32", 3, universal=True)),
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
    runs = [dict(config=cfg, steps=STEPS, save_at=SAVE_AT, save_dir=str(root / n)) for n, cfg in SOURCES.items()]
    results = _launch(2, runs, root / "log_src")
    out = {n: {"dir": str(root / n), "losses": r["losses"]} for n, r in zip(SOURCES, results)}
    for n in SOURCES:
        out[n]["universal"] = ds_to_universal(out[n]["dir"])
    return out


@pytest.fixture(scope="module")
def loaded(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("ds_ucp_in")
    runs = [dict(config=cfg, steps=STEPS - SAVE_AT, init_seed=1, imports=U, load_dir=sources[src]["dir"],
                 tag=f"{TAG}_universal") for src, _, cfg in IN.values()]
    return dict(zip(IN, _launch(3, runs, root / "log")))


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
