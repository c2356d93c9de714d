"""Universal checkpoints across DeepSpeed layouts and optimizers, on real engines (gloo, CPU).

Sources train 8 steps uninterrupted and save after step 3 (the 8-step losses are the reference);
targets load that checkpoint on another layout with a *different* init seed, so every weight, the
frozen parameter and the buffer must come from the checkpoint, re-save at once (before any step) and
train 5 steps. fp32 targets must reproduce the reference losses within 1e-5 relative, the
checkpoint's weights exactly (digest), and their re-save must hold the source's fp32 master and
optimizer states bit for bit. The bad-input runs share the DP2 target launch.
Launches are batched per world size: 2 source launches, 4 target launches.
"""
from __future__ import annotations

import math
import os
import shutil

import pytest
import torch

from tests.ds_checks import assert_resave_bitwise, bits, checkpoint_digest, launch, rank0, rel
from tests.ds_harness import ds_config as C

pytestmark = pytest.mark.slow
U = ["ucp_plugin.deepspeed"]
STEPS, SAVE_AT, TOL, BF16_TOL = 8, 3, 1e-5, 1e-3
SGD = dict(client="sgd", split_groups=True)  # torch SGD, momentum 0.9, two param groups
CLIENT_ADAMW = dict(client="adamw")

SOURCES = {  # name: (world size, config, other train() arguments)
    "z2_dp4": (4, C(2, "fp32", 4, universal=True), {}),
    # the async source runs right after its sync twin: with a ZeRO-3 run between them in the same
    # process the later run's optimizer states differ by an ulp (sync and async alike)
    "z2_dp4_async": (4, C(2, "fp32", 4, universal="async"), {}),  # saved while training goes on
    "z3_dp4": (4, C(3, "fp32", 4, universal=True), {}),
    "native_z3_dp4": (4, C(3, "fp32", 4), {}),  # plain DeepSpeed checkpoint (plugin imported, not enabled)
    "z1_dp2": (2, C(1, "fp32", 2, universal=True), {}),
    "bf16_dp2": (2, C(1, "bf16", 2, grad_accum_dtype="fp32", universal=True), {}),  # BF16_Optimizer
    "native_dp2": (2, C(2, "fp32", 2), {}),
    "native_bf16_z2_dp2": (2, C(2, "bf16", 2), {}),  # DeepSpeedZeroOptimizer in bf16
    "native_bf16_z1_dp2": (2, C(1, "bf16", 2, grad_accum_dtype="fp32"), {}),  # BF16_Optimizer
    "sgd_z2_dp2": (2, C(2, "fp32", 2, optimizer="client", lr=0.05, universal=True), SGD),
    "client_adamw_z1_dp2": (2, C(1, "fp32", 2, optimizer="client", universal=True), CLIENT_ADAMW),
    "adam_z3_dp2": (2, C(3, "fp32", 2, optimizer="adam", universal=True), {}),  # Adam, amsgrad
}
TRANSITIONS = {  # name: (source, target world size, target config); other arguments as the source's
    "zero1_dp2_to_dp4": ("z1_dp2", 4, C(1, "fp32", 4, universal=True)),
    "native_zero2_dp2_to_plugin_dp4": ("native_dp2", 4, C(2, "fp32", 4, universal=True)),
    "zero2_dp4_to_dp2": ("z2_dp4", 2, C(2, "fp32", 2, universal=True)),
    "async_zero2_dp4_to_async_dp2": ("z2_dp4_async", 2, C(2, "fp32", 2, universal="async")),
    "zero2_dp4_to_zero3_dp2": ("z2_dp4", 2, C(3, "fp32", 2, universal=True)),
    "zero3_dp4_to_zero1_dp2": ("z3_dp4", 2, C(1, "fp32", 2, universal=True)),
    "native_zero3_dp4_to_plugin_zero3_dp2": ("native_z3_dp4", 2, C(3, "fp32", 2, universal=True)),
    "bf16_zero1_dp2_to_fp32_zero2_dp2": ("bf16_dp2", 2, C(2, "fp32", 2, universal=True)),
    "native_bf16_zero2_dp2_to_plugin_bf16_zero2_dp3": ("native_bf16_z2_dp2", 3,
                                                       C(2, "bf16", 3, universal=True)),
    "native_bf16_zero1_dp2_to_plugin_bf16_zero1_dp1": ("native_bf16_z1_dp2", 1,
                                                       C(1, "bf16", 1, grad_accum_dtype="fp32", universal=True)),
    "sgd_zero2_dp2_to_dp3": ("sgd_z2_dp2", 3, C(2, "fp32", 3, optimizer="client", lr=0.05, universal=True)),
    "client_adamw_zero1_dp2_to_zero3_dp3": ("client_adamw_z1_dp2", 3,
                                            C(3, "fp32", 3, optimizer="client", universal=True)),
    "adam_zero3_dp2_to_zero1_dp1": ("adam_z3_dp2", 1, C(1, "fp32", 1, optimizer="adam", universal=True)),
    "zero2_dp4_to_dp3": ("z2_dp4", 3, C(2, "fp32", 3, universal=True)),
    "zero3_dp4_to_dp1": ("z3_dp4", 1, C(3, "fp32", 1, universal=True)),
    "zero3_dp4_to_stage0_dp1": ("z3_dp4", 1, C(0, "fp32", 1, universal=True)),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    out = {}
    for world in (4, 2):
        names = [n for n, (w, _, _) in SOURCES.items() if w == world]
        runs = [dict(config=SOURCES[n][1], steps=STEPS, save_at=SAVE_AT, save_dir=str(root / n), imports=U,
                     **SOURCES[n][2]) for n in names]
        results = launch(world, runs, root / f"log{world}")
        out.update({n: {"dir": str(root / n), **rank0(r)} for n, r in zip(names, results)})
    return out


def _error_runs(sources, root) -> dict[str, dict]:
    """Bad inputs, run in the DP2 target launch: each must fail on every rank with the message tested."""
    incomplete = root / "incomplete"
    shutil.copytree(sources["z1_dp2"]["dir"], incomplete)
    os.remove(incomplete / "global_step3" / "ucp.json")  # as if the save died before its commit
    z1 = dict(config=C(1, "fp32", 2, universal=True), steps=1, imports=U, expect_error=True)
    return {
        "init_offload_param_nvme": dict(z1, config=C(3, "fp32", 2, universal=True, offload_param={
            "device": "nvme", "nvme_path": str(root / "nvme")}), steps=0),
        "missing_parameter": dict(z1, load_dir=sources["z1_dp2"]["dir"], model={"layers": 3}),
        "extra_parameter": dict(z1, load_dir=sources["z1_dp2"]["dir"], model={"layers": 1}),
        "other_shape": dict(z1, load_dir=sources["z1_dp2"]["dir"], model={"hidden": 47}),
        "no_commit_marker": dict(z1, load_dir=str(incomplete)),
        "other_optimizer": dict(z1, load_dir=sources["sgd_z2_dp2"]["dir"], split_groups=True),
        "empty_folder": dict(z1, load_dir=str(root / "empty")),
    }


@pytest.fixture(scope="module")
def targets(sources, tmp_path_factory):
    root, out = tmp_path_factory.mktemp("targets"), {}
    for world in (4, 2, 3, 1):
        names = [n for n, (_, w, _) in TRANSITIONS.items() if w == world]
        runs = [dict(config=TRANSITIONS[n][2], steps=STEPS - SAVE_AT, init_seed=1, imports=U, save_at=0,
                     load_dir=sources[TRANSITIONS[n][0]]["dir"], save_dir=str(root / "resave" / n),
                     **SOURCES[TRANSITIONS[n][0]][2]) for n in names]
        errors = _error_runs(sources, root) if world == 2 else {}
        results = launch(world, runs + list(errors.values()), root / f"log{world}")
        out.update({n: {"resave": str(root / "resave" / n), **rank0(r)} for n, r in zip(names, results)})
        out.update({f"error:{n}": r[0] for n, r in zip(errors, results[len(runs):])})
    return out


@pytest.mark.parametrize("name", list(TRANSITIONS))
def test_transition_resumes_exactly(name, sources, targets):
    source = sources[TRANSITIONS[name][0]]
    result = targets[name]
    reference = source["losses"][SAVE_AT:]
    assert result["start_step"] == SAVE_AT
    assert result["client_state"]["losses"] == source["losses"][:SAVE_AT]
    dtype = torch.bfloat16 if TRANSITIONS[name][2].get("bf16", {}).get("enabled") else torch.float32
    assert rel(result["digest_after_load"], checkpoint_digest(source["dir"], dtype)) < 1e-9
    worst = max(rel(a, b) for a, b in zip(result["losses"], reference))
    tol = BF16_TOL if "bf16" in name else TOL  # a bf16 run is only a rounding-level reference
    assert len(result["losses"]) == STEPS - SAVE_AT and worst < tol, (result["losses"], reference)


@pytest.mark.parametrize("name", list(TRANSITIONS))
def test_resave_holds_the_same_state_bitwise(name, sources, targets):
    """The target re-saved right after loading: per parameter, the fp32 master and every optimizer
    state (names from the source, e.g. momentum_buffer, max_exp_avg_sq) and ``step`` are the saved ones."""
    assert_resave_bitwise(sources[TRANSITIONS[name][0]]["dir"], targets[name]["resave"])


def test_async_save_holds_what_a_sync_save_holds(sources):
    """The asynchronous save (written while the engine trained on) is bit for bit the synchronous one."""
    from ucp_plugin.storage import Checkpoint

    sync, other = (sources[n] for n in ("z2_dp4", "z2_dp4_async"))
    assert other["losses"] == sync["losses"]
    a, b = (Checkpoint.open(s["dir"]) for s in (sync, other))
    assert [x.name for x in a.manifest.atoms] == [x.name for x in b.manifest.atoms]
    for atom in a.manifest.atoms:
        assert (atom.states, atom.scalars) == (b.manifest.atom(atom.name).states, b.manifest.atom(atom.name).scalars)
        for state in atom.states:
            assert torch.equal(bits(a.read_atom(atom.name, state)), bits(b.read_atom(atom.name, state)))
    for name in sorted(os.listdir(os.path.join(a.path, "state"))):  # common and per-rank trees, byte for byte
        with open(os.path.join(a.path, "state", name), "rb") as f, open(os.path.join(b.path, "state", name), "rb") as g:
            assert f.read() == g.read(), name


def test_optimizer_states_come_from_the_optimizer(sources):
    from ucp_plugin.storage import Checkpoint

    def states(name):
        atoms = Checkpoint.open(sources[name]["dir"]).manifest.atoms
        return {k for a in atoms if a.kind == "param" for k in a.states}, \
            {k for a in atoms if a.kind == "param" for k in a.scalars}

    assert states("sgd_z2_dp2") == ({"fp32", "momentum_buffer"}, set())
    assert states("adam_z3_dp2") == ({"fp32", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}, {"step"})
    assert states("client_adamw_z1_dp2") == ({"fp32", "exp_avg", "exp_avg_sq"}, {"step"})


def _needed_bytes(path: str) -> tuple[int, int]:
    """(bytes of every trainable atom state, bytes of frozen parameters and buffers) in a checkpoint."""
    from ucp_plugin.storage import Checkpoint

    trainable = other = 0
    for a in Checkpoint.open(path).manifest.atoms:
        size = math.prod(a.shape) * sum(torch.empty(0, dtype=getattr(torch, d)).element_size()
                                        for d in a.states.values())
        trainable, other = (trainable + size, other) if a.kind == "param" else (trainable, other + size)
    return trainable, other


@pytest.mark.parametrize("name,dp,slack", [("zero2_dp4_to_dp2", 2, 1.10), ("zero2_dp4_to_dp3", 3, 1.25)])
def test_load_reads_only_what_the_rank_needs(name, dp, slack, sources, targets):
    """ZeRO-1/2 rank r needs its 1/dp of every trainable state, and all frozen params and buffers."""
    trainable, other = _needed_bytes(sources["z2_dp4"]["dir"])
    reports = [r[0] for r in targets[name]["load_reports"]]
    assert [r["rank"] for r in reports] == list(range(dp))
    assert sum(r["requested"] for r in reports) == trainable + dp * other  # no element asked twice
    for r in reports:
        assert r["requested"] <= (trainable / dp) * 1.02 + other, r
        assert r["requested"] <= r["fetched"] <= slack * r["requested"], r


def test_sources_agree_with_each_other(sources):
    """Every fp32 layout and the AdamW config/client pair compute the same uninterrupted losses."""
    fp32 = [s["losses"] for n, s in sources.items() if "bf16" not in n and n.split("_")[0] not in ("sgd", "adam")]
    assert len(fp32) == 7 and all(max(rel(a, b) for a, b in zip(run, fp32[0])) < TOL for run in fp32)


def test_native_files_need_the_safe_loader(sources):
    from ucp_plugin.dsfiles.native import safe_load

    folder = os.path.join(sources["native_dp2"]["dir"], "global_step3")
    optim = os.path.join(folder, "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(optim, weights_only=True)
    assert safe_load(optim)["optimizer_state_dict"]["partition_count"] == [2]
    assert not os.path.exists(os.path.join(folder, "ucp.json"))  # the plugin left plain DeepSpeed alone


ERRORS = {  # run: (exception type, texts the message must contain)
    # NVMe offload needs DeepSpeed's aio op: the message says why it is refused here (no libaio, or
    # swapped state not mapped) and names the setting to use instead
    "init_offload_param_nvme": ("UnsupportedError", ['"zero_optimization.offload_param": {"device": "nvme"}',
                                                     'use "device": "cpu"']),
    "missing_parameter": ("StateMismatchError", ["checkpoint lacks", "'blocks.2.", "z1_dp2"]),
    "extra_parameter": ("StateMismatchError", ["the model lacks", "'blocks.1.", "load_module_strict=False"]),
    "other_shape": ("StateMismatchError", ["'blocks.0.fc.weight' has shape (45, 18) in the checkpoint but "
                                           "(47, 18) in the model"]),
    "no_commit_marker": ("FormatError", ["incomplete/global_step3: no ucp.json", "not a committed"]),
    "other_optimizer": ("StateMismatchError", ["saved by SGD", "AdamW", "load_optimizer_states=False"]),
    "empty_folder": ("RuntimeError", ["no checkpoint loaded"]),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_input_is_refused_naming_the_problem(name, targets):
    """Unsupported settings stop ``deepspeed.initialize`` (these runs train 0 steps and never save or
    load); mismatched or incomplete checkpoints stop the load on every rank; an empty folder loads
    nothing, as DeepSpeed does."""
    kind, texts = ERRORS[name]
    error = targets[f"error:{name}"]["error"]
    assert error is not None and error.startswith(kind + ":"), error
    assert all(t in error for t in texts), error
