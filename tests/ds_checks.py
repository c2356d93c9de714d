"""What the multi-process DeepSpeed test files share: launching batches of ``ds_harness.train`` runs,
and checking a resumed run against its source (weights digest, losses, bitwise re-save)."""
from __future__ import annotations

import math
import os

import torch

from ucp_plugin.testing import nccl_rule
from ucp_plugin.testing.launcher import run_workers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(world: int, runs: list[dict], log_dir) -> list[list[dict]]:
    """``ds_harness.train_many`` over ``world`` ranks; per run, every rank's result."""
    env = {"PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1",
           nccl_rule.ENV: "1"}  # the plugin's collectives as on an NCCL default group
    ranks = run_workers(world, "tests.ds_harness:train_many", {"runs": runs}, timeout=900, env=env,
                        log_dir=str(log_dir))
    return [list(per_run) for per_run in zip(*ranks)]


def rank0(results: list[dict]) -> dict:
    return {**results[0], "load_reports": [r["load_reports"] for r in results]}


def checkpoint_digest(path: str, dtype: torch.dtype = torch.float32) -> float:
    """Sum of every master weight (rounded to the model's ``dtype``), frozen parameter and buffer
    stored in a checkpoint: what ``weights_digest`` of a model holding them returns."""
    from ucp_plugin.deepspeed.sources import open_source

    src = open_source(path)
    total = 0.0
    for name, meta in src.atoms.items():
        state = "fp32" if meta.kind == "param" else "param"
        weights = src.read(name, state, 0, math.prod(meta.shape), torch.float32)
        total += (weights.to(dtype) if meta.kind == "param" else weights).double().sum().item()
    return total


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_resave_bitwise(source_dir: str, resave_dir: str) -> None:
    """A target re-saved right after loading ``source_dir`` (universal or native): per parameter, the
    fp32 master, every optimizer state (names from the source) and every scalar (``step``) are the
    saved ones, bit for bit."""
    from ucp_plugin.deepspeed.sources import open_source
    from ucp_plugin.storage import Checkpoint

    src, again = open_source(source_dir), Checkpoint.open(resave_dir)
    atoms = {a.name: a for a in again.manifest.atoms}
    assert set(atoms) == set(src.atoms)
    for atom_name, meta in src.atoms.items():
        assert set(atoms[atom_name].states) == set(meta.states), atom_name
        assert dict(atoms[atom_name].scalars) == meta.scalars, atom_name
        for state, dtype in meta.states.items():
            saved = src.read(atom_name, state, 0, math.prod(meta.shape), getattr(torch, dtype))
            loaded = again.read_atom(atom_name, state).reshape(-1)
            if loaded.dtype == saved.dtype:
                assert torch.equal(bits(loaded), bits(saved)), (atom_name, state)
            else:  # e.g. a bf16 frozen parameter held in fp32 by an fp32 target: same values
                assert torch.equal(loaded.double(), saved.double()), (atom_name, state)
