"""Universal checkpoints across DeepSpeed layouts, on real engines (gloo, CPU).

Sources train 8 steps uninterrupted and save after step 3 (the 8-step losses are the reference);
targets load that checkpoint on another layout with a *different* init seed, so every weight, the
frozen parameter and the buffer must come from the checkpoint, then train 5 steps. fp32 targets must
reproduce the reference losses within 1e-5 relative and the checkpoint's weights exactly (digest).
Launches are batched per world size: 2 source launches, 4 target launches.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from tests.ds_harness import ds_config as C
from ucp_plugin.launcher import run_workers

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
U = ["ucp_plugin.deepspeed"]
STEPS, SAVE_AT, TOL = 8, 3, 1e-5

SOURCES = {  # name: (world size, config)
    "z2_dp4": (4, C(2, "fp32", 4, universal=True)),
    "z3_dp4": (4, C(3, "fp32", 4, universal=True)),
    "z1_dp2": (2, C(1, "fp32", 2, universal=True)),
    "bf16_dp2": (2, C(1, "bf16", 2, grad_accum_dtype="fp32", universal=True)),  # BF16_Optimizer
    "native_dp2": (2, C(2, "fp32", 2)),  # plain DeepSpeed checkpoint (plugin imported but not enabled)
}
TRANSITIONS = {  # name: (source, target world size, target config)
    "zero1_dp2_to_dp4": ("z1_dp2", 4, C(1, "fp32", 4, universal=True)),
    "native_zero2_dp2_to_plugin_dp4": ("native_dp2", 4, C(2, "fp32", 4, universal=True)),
    "zero2_dp4_to_dp2": ("z2_dp4", 2, C(2, "fp32", 2, universal=True)),
    "zero2_dp4_to_zero3_dp2": ("z2_dp4", 2, C(3, "fp32", 2, universal=True)),
    "zero3_dp4_to_zero1_dp2": ("z3_dp4", 2, C(1, "fp32", 2, universal=True)),
    "bf16_zero1_dp2_to_fp32_zero2_dp2": ("bf16_dp2", 2, C(2, "fp32", 2, universal=True)),
    "zero2_dp4_to_dp3": ("z2_dp4", 3, C(2, "fp32", 3, universal=True)),
    "zero3_dp4_to_dp1": ("z3_dp4", 1, C(3, "fp32", 1, universal=True)),
    "zero3_dp4_to_stage0_dp1": ("z3_dp4", 1, C(0, "fp32", 1, universal=True)),
}


def _launch(world: int, runs: list[dict], log_dir) -> list[dict]:
    env = {"PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    return run_workers(world, "tests.ds_harness:train_many", {"runs": runs}, timeout=900, env=env,
                       log_dir=str(log_dir))[0]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    out = {}
    for world in (4, 2):
        names = [n for n, (w, _) in SOURCES.items() if w == world]
        runs = [dict(config=SOURCES[n][1], steps=STEPS, save_at=SAVE_AT, save_dir=str(root / n), imports=U)
                for n in names]
        out.update({n: {"dir": str(root / n), **r} for n, r in zip(names, _launch(world, runs, root / f"log{world}"))})
    return out


@pytest.fixture(scope="module")
def targets(sources, tmp_path_factory):
    root, out = tmp_path_factory.mktemp("targets"), {}
    for world in (4, 2, 3, 1):
        names = [n for n, (_, w, _) in TRANSITIONS.items() if w == world]
        runs = [dict(config=TRANSITIONS[n][2], steps=STEPS - SAVE_AT, init_seed=1, imports=U,
                     load_dir=sources[TRANSITIONS[n][0]]["dir"]) for n in names]
        out.update(zip(names, _launch(world, runs, root / f"log{world}")))
    return out


def checkpoint_digest(path: str) -> float:
    """Sum of every fp32 master weight, frozen parameter and buffer stored in a checkpoint."""
    from ucp_plugin.deepspeed.sources import open_source

    src = open_source(path)
    total = 0.0
    for name, meta in src.atoms.items():
        state = "fp32" if meta.kind == "param" else "param"
        total += src.read(name, state, 0, math.prod(meta.shape), torch.float64).sum().item()
    return total


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("name", list(TRANSITIONS))
def test_transition_resumes_exactly(name, sources, targets):
    source = sources[TRANSITIONS[name][0]]
    result = targets[name]
    reference = source["losses"][SAVE_AT:]
    assert result["start_step"] == SAVE_AT
    assert result["client_state"]["losses"] == source["losses"][:SAVE_AT]
    assert rel(result["digest_after_load"], checkpoint_digest(source["dir"])) < 1e-9
    worst = max(rel(a, b) for a, b in zip(result["losses"], reference))
    tol = 1e-3 if name.startswith("bf16") else TOL  # a bf16 run is only a rounding-level reference
    assert len(result["losses"]) == STEPS - SAVE_AT and worst < tol, (result["losses"], reference)


def test_sources_agree_with_each_other(sources):
    """Every fp32 layout computes the same uninterrupted losses (so any of them is the reference)."""
    fp32 = [s["losses"] for n, s in sources.items() if not n.startswith("bf16")]
    assert all(max(rel(a, b) for a, b in zip(run, fp32[0])) < TOL for run in fp32)


def test_native_files_need_the_safe_loader(sources):
    from ucp_plugin.deepspeed.native import safe_load

    folder = os.path.join(sources["native_dp2"]["dir"], "global_step3")
    optim = os.path.join(folder, "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(optim, weights_only=True)
    assert safe_load(optim)["optimizer_state_dict"]["partition_count"] == [2]
    assert not os.path.exists(os.path.join(folder, "ucp.json"))  # the plugin left plain DeepSpeed alone


def test_errors_name_the_problem(sources, tmp_path):
    """A model of another shape is refused naming the parameter; a folder with no checkpoint and no
    tag loads nothing, as DeepSpeed does (``(None, None)``)."""
    runs = [dict(config=C(2, "fp32", 1, universal=True), steps=1, load_dir=sources["z2_dp4"]["dir"],
                 model={"hidden": 47}, imports=U, expect_error=True),
            dict(config=C(2, "fp32", 1, universal=True), steps=1, load_dir=str(tmp_path / "empty"),
                 imports=U, expect_error=True)]
    mismatch, empty = (r["error"] for r in _launch(1, runs, tmp_path / "log"))
    assert mismatch.startswith("StateMismatchError") and "blocks.0.fc.weight" in mismatch, mismatch
    assert "no checkpoint loaded" in empty, empty
