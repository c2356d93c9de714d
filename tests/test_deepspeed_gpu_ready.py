"""DeepSpeed as GPU users run it, on real engines (gloo, CPU): DeepSpeed's default optimizer (FusedAdam,
whose ``step`` is a Python int), ZeRO-Offload (DeepSpeedCPUAdam), and dropout resumed bit-exactly.

Sources train 8 steps uninterrupted and save after step 3; targets load on another layout, optimizer
or offload setting with another init seed, re-save at once and train 5 steps: losses within 1e-5
relative of the uninterrupted run, the re-save bitwise the source's state (``step`` included).
Three launches: DP2 (sources, and the same-layout resumes that load them in the same launch), DP3, DP1.
FusedAdam and CPUAdam are prebuilt by scripts/setup_env.sh (else the first launch compiles them).
"""
from __future__ import annotations

import pytest

from tests.ds_checks import assert_resave_bitwise, checkpoint_digest, launch, rank0, rel
from tests.ds_harness import ds_config as C

pytestmark = pytest.mark.slow
U = ["ucp_plugin.deepspeed"]
STEPS, SAVE_AT, TOL = 8, 3, 1e-5
CPU = {"device": "cpu"}
OFF_OPT = dict(offload_optimizer=CPU)
OFF_ALL = dict(offload_optimizer=CPU, offload_param=CPU)
DROPOUT = {"dropout": 0.1}

SOURCES = {  # name: (config, other train() arguments); all DP2
    "native_fused_z2": (C(2, "fp32", 2, optimizer="fused"), {}),
    "native_fused_z3": (C(3, "fp32", 2, optimizer="fused"), {}),
    "fused_z2": (C(2, "fp32", 2, optimizer="fused", universal=True), {}),
    "fused_z3": (C(3, "fp32", 2, optimizer="fused", universal=True), {}),
    "offload_z2": (C(2, "fp32", 2, optimizer="fused", universal=True, **OFF_OPT), {}),  # DeepSpeedCPUAdam
    "adamw_z3": (C(3, "fp32", 2, universal=True), {}),  # torch AdamW, tensor step
    "native_offload_z3": (C(3, "fp32", 2, optimizer="fused", **OFF_ALL), {}),
    "dropout_z1": (C(1, "fp32", 2, universal=True), {"model": DROPOUT}),
}
TRANSITIONS = {  # name: (source, target world size, target config)
    "fused_native_zero2_dp2_to_dp3": ("native_fused_z2", 3, C(2, "fp32", 3, optimizer="fused",
                                                               universal=True)),
    "fused_zero2_dp2_to_dp3": ("fused_z2", 3, C(2, "fp32", 3, optimizer="fused", universal=True)),
    "fused_native_zero3_dp2_to_zero1_dp1": ("native_fused_z3", 1, C(1, "fp32", 1, optimizer="fused",
                                                                     universal=True)),
    "fused_zero3_dp2_to_zero1_dp1": ("fused_z3", 1, C(1, "fp32", 1, optimizer="fused", universal=True)),
    "offload_zero2_dp2_to_no_offload_zero3_dp3": ("offload_z2", 3, C(3, "fp32", 3, optimizer="fused",
                                                                     universal=True)),
    "offload_zero2_dp2_to_offload_zero3_dp3": ("offload_z2", 3, C(3, "fp32", 3, optimizer="fused",
                                                                  universal=True, **OFF_ALL)),
    "torch_adamw_zero3_dp2_to_offload_zero1_dp3": ("adamw_z3", 3, C(1, "fp32", 3, optimizer="fused",
                                                                    universal=True, **OFF_OPT)),
    "native_offload_zero3_dp2_to_torch_adamw_stage0_dp1": ("native_offload_z3", 1,
                                                           C(0, "fp32", 1, universal=True)),
}
SAME_LAYOUT = {  # loaded in the DP2 launch right after the sources: bit-exact continuation
    "dropout_zero1_dp2_to_same_layout": "dropout_z1",
    "offload_zero2_dp2_to_same_layout": "offload_z2",
}


def _target_run(source: str, config: dict, save_dir, load_dir) -> dict:
    return dict(config=config, steps=STEPS - SAVE_AT, init_seed=1, imports=U, save_at=0, load_dir=str(load_dir),
                save_dir=str(save_dir), **SOURCES[source][1])


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    """Every run's rank-0 result: sources by name, targets by transition name."""
    root = tmp_path_factory.mktemp("gpu_ready")
    out = {}
    runs = [dict(config=cfg, steps=STEPS, save_at=SAVE_AT, save_dir=str(root / n), imports=U, **kw)
            for n, (cfg, kw) in SOURCES.items()]
    runs += [_target_run(s, SOURCES[s][0], root / "resave" / n, root / s) for n, s in SAME_LAYOUT.items()]
    results = launch(2, runs, root / "log2")
    out.update({n: {"dir": str(root / n), **rank0(r)} for n, r in zip(SOURCES, results)})
    out.update({n: {"resave": str(root / "resave" / n), **rank0(r)}
                for n, r in zip(SAME_LAYOUT, results[len(SOURCES):])})
    for world in (3, 1):
        names = [n for n, t in TRANSITIONS.items() if t[1] == world]
        runs = [_target_run(TRANSITIONS[n][0], TRANSITIONS[n][2], root / "resave" / n, root / TRANSITIONS[n][0])
                for n in names]
        out.update({n: {"resave": str(root / "resave" / n), **rank0(r)}
                    for n, r in zip(names, launch(world, runs, root / f"log{world}"))})
    _print_table(out)
    return out


def _source_of(name: str) -> str:
    return TRANSITIONS[name][0] if name in TRANSITIONS else SAME_LAYOUT[name]


def _worst(campaign, name: str) -> float:
    reference = campaign[_source_of(name)]["losses"][SAVE_AT:]
    return max(rel(a, b) for a, b in zip(campaign[name]["losses"], reference))


def _print_table(campaign) -> None:
    """optimizer x layout change x offload with the worst relative loss difference (pytest -s)."""
    print("\n| transition | source optimizer | max rel. loss diff |")
    for name in list(TRANSITIONS) + list(SAME_LAYOUT):
        if "losses" in campaign.get(name, {}):
            source = _source_of(name)
            optimizer = "torch AdamW" if source in ("adamw_z3", "dropout_z1") else \
                "DeepSpeedCPUAdam" if "offload" in source else "FusedAdam"
            print(f"| {name} | {optimizer} | {_worst(campaign, name):.1e} |")


@pytest.mark.parametrize("name", list(TRANSITIONS) + list(SAME_LAYOUT))
def test_resumes_within_tolerance_and_resaves_bitwise(name, campaign):
    source, result = campaign[_source_of(name)], campaign[name]
    assert result["start_step"] == SAVE_AT
    assert rel(result["digest_after_load"], checkpoint_digest(source["dir"])) < 1e-9
    assert len(result["losses"]) == STEPS - SAVE_AT and _worst(campaign, name) < TOL, \
        (result["losses"], source["losses"][SAVE_AT:])
    assert_resave_bitwise(source["dir"], result["resave"])


@pytest.mark.parametrize("name", list(SAME_LAYOUT))
def test_same_layout_resume_is_bit_exact(name, campaign):
    """On the layout that saved it, every rank continues its own RNG streams: with dropout on, the
    resumed losses are the uninterrupted run's exactly."""
    assert campaign[name]["losses"] == campaign[_source_of(name)]["losses"][SAVE_AT:]


def test_dropout_changes_the_losses(campaign):
    """The dropout run draws masks (else the bit-exact resume above would prove nothing of the RNG)."""
    plain = campaign["adamw_z3"]["losses"]  # the same optimizer without dropout
    assert all(rel(a, b) > 1e-4 for a, b in zip(campaign["dropout_z1"]["losses"][1:], plain[1:]))


def test_steps_are_saved_as_numbers(campaign):
    """FusedAdam's and CPUAdam's int ``step`` and torch's tensor ``step`` are all the same scalar."""
    from ucp_plugin.deepspeed.sources import open_source

    for name in ("native_fused_z2", "fused_z3", "offload_z2", "adamw_z3", "native_offload_z3"):
        atoms = open_source(campaign[name]["dir"]).atoms.values()
        assert {a.scalars.get("step") for a in atoms if a.kind == "param"} == {SAVE_AT}, name
