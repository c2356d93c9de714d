"""What the multi-process Megatron test files share: running a plan of save/load runs in few launches
(``mg_workers.schedule``), reading its results, and comparing a checkpoint with its re-save."""
from __future__ import annotations

import os
import time

import torch

from mg_workers import schedule
from ucp_plugin.storage import Checkpoint
from ucp_plugin.testing import nccl_rule
from ucp_plugin.testing.launcher import run_workers

# a two-layer GPT and Mixtral trained SAVE_AFTER steps, saved, and resumed for the remaining three
SAVE_AFTER = 2
SETTINGS = dict(steps=SAVE_AFTER + 3, global_batch=4, lr=1e-2)
SIZES = dict(hidden=32, heads=4, ffn=64, layers=2, vocab=100, divisible_by=32, seq_length=16)
GPT = dict(SIZES, tied=True)
MIXTRAL = dict(SIZES, query_groups=2, ffn=48, experts=4, moe_ffn=40)


def run_campaign(runs: list[dict], target: str = "mg_workers:run_plan", env: dict | None = None,
                 timeout: float = 1200) -> dict:
    """{run id: [per-rank result]} of every run, each world size's ready runs in one launch."""
    here = os.path.dirname(__file__)
    # the plugin's collectives run under NCCL's device rule, as on a GPU job's default group
    env = {"PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", ""), nccl_rule.ENV: "1", **(env or {})}
    results = {}
    for world, batch in schedule(runs):
        start = time.perf_counter()
        per_rank = run_workers(world, target, {"runs": batch}, timeout=timeout, env=env)
        print(f"launch of {world} rank(s), {len(batch)} runs: {time.perf_counter() - start:.0f} s")
        for run in batch:
            results[run["id"]] = [r[run["id"]] for r in per_rank]
    return results


def ok(results: dict, rid: str) -> dict:
    """Rank 0's result of a run that succeeded and whose ranks agree on the losses."""
    first = results[rid][0]
    assert "error" not in first, f"{rid}: {first['error']}"
    assert all(r["losses"] == first["losses"] for r in results[rid]), f"{rid}: ranks disagree on losses"
    return first


def rel(a: list[float], b: list[float]) -> float:
    """Largest relative difference of two loss curves."""
    assert len(a) == len(b), (a, b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def model_record(record: dict, drop: tuple[str, ...] = ()) -> dict:
    """A manifest's ``model`` / common state with the ModelConfig fields in ``drop`` left out."""
    out = dict(record)
    for key in ("config", "model_config"):
        if isinstance(out.get(key), dict):
            out[key] = {k: v for k, v in out[key].items() if k not in drop}
    return out


def assert_same_atoms(saved: str, resaved: str, config_may_differ: tuple[str, ...] = ()):
    """Bitwise the same consolidated tensors and scalars, same family, iteration and model (the
    layout, the pieces and the framework's common state may differ). Returns both checkpoints."""
    a, b = Checkpoint.open(saved), Checkpoint.open(resaved)
    assert {x.name for x in a.manifest.atoms} == {x.name for x in b.manifest.atoms}
    assert (a.manifest.family, a.manifest.iteration, model_record(a.manifest.model, config_may_differ)) == \
        (b.manifest.family, b.manifest.iteration, model_record(b.manifest.model, config_may_differ))
    for atom in a.manifest.atoms:
        other = b.manifest.atom(atom.name)
        assert (atom.kind, atom.shape, atom.split, atom.states, atom.scalars) == \
            (other.kind, other.shape, other.split, other.states, other.scalars), atom.name
        for state in atom.states:
            assert torch.equal(a.read_atom(atom.name, state), b.read_atom(atom.name, state)), \
                f"{atom.name} {state} differs after load + re-save"
    return a, b
