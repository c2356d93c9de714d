"""``transformers.Trainer`` + DeepSpeed (ZeRO-2 and ZeRO-3) with universal checkpoints
(``recipes/hf_trainer``): 2 processes train 6 steps and save after step 3; the checkpoint resumes on
1 and on 3 processes through Trainer's own ``resume_from_checkpoint``. Dropout is 0 and the global
batch is the same at every process count, so each resumed step's global mean loss (the mean of the
ranks' equal-sized micro-batch losses) must equal the uninterrupted run's within 1e-5 relative.
"""
from __future__ import annotations

import os

import pytest

from ucp_plugin.testing.launcher import run_workers

pytestmark = pytest.mark.slow
pytest.importorskip("transformers")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, SAVE_AT, TOL = 6, 3, 1e-5
STAGES = (2, 3)


def _launch(world: int, runs: list[dict], log_dir: str) -> list[list[float]]:
    """Per run, the global mean loss of each step it trained (and its first step)."""
    env = {"PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    ranks = run_workers(world, "recipes.hf_trainer.train:worker", {"runs": runs}, timeout=900, env=env,
                        log_dir=log_dir)
    out = []
    for per_rank in zip(*ranks):
        steps = zip(*[r["losses"] for r in per_rank])
        out.append((per_rank[0]["first_step"], [sum(s) / len(s) for s in steps]))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_trainer")
    saved = _launch(2, [dict(stage=s, out=str(root / f"z{s}"), max_steps=STEPS, save_steps=SAVE_AT) for s in STAGES],
                    str(root / "log2"))
    resumed = {}
    for world in (1, 3):
        results = _launch(world, [dict(stage=s, out=str(root / f"z{s}_w{world}"), max_steps=STEPS, save_steps=100,
                                       resume=str(root / f"z{s}" / f"checkpoint-{SAVE_AT}")) for s in STAGES],
                          str(root / f"log{world}"))
        resumed.update({(s, world): r for s, r in zip(STAGES, results)})
    return {"saved": dict(zip(STAGES, saved)), "resumed": resumed, "root": root}


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("world", (1, 3))
def test_trainer_resumes_universal_checkpoint_on_other_process_count(runs, stage, world):
    first, reference = runs["saved"][stage]
    start, resumed = runs["resumed"][(stage, world)]
    assert (first, start) == (1, SAVE_AT + 1)
    for a, b in zip(resumed, reference[SAVE_AT:], strict=True):
        assert abs(a - b) <= TOL * abs(b), (stage, world, resumed, reference)


def test_trainer_checkpoint_is_universal_and_exports_to_hf(runs, tmp_path):
    """The checkpoint is ours; ``ucp export --to hf`` writes it with the config.json Trainer saved."""
    import torch
    import transformers

    from ucp_plugin.storage import Checkpoint
    from ucp_plugin.tools.hf_export import export_hf
    path = str(runs["root"] / "z3" / f"checkpoint-{SAVE_AT}" / f"global_step{SAVE_AT}")
    ck = Checkpoint.open(path)
    assert ck.manifest.layout.dp == 2 and ck.manifest.layout.zero_stage == 3
    model = transformers.AutoModelForCausalLM.from_pretrained(export_hf(path, str(tmp_path / "hf")))
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), ck.read_atom(name, "fp32")), name
