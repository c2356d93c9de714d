"""The main job: train a model family on layout A, save a universal checkpoint, resume on layout B
in fresh processes, compare with an uninterrupted run on A, write losses (CSV/JSON) and a plot.

    python3 -m recipes.main --family gpt --layout-a zero2-dp4 --layout-b zero3-dp2
    python3 -m recipes.main --family llama --layout-a tp2-pp2 --layout-b tp1-dp4
    python3 -m recipes.main --family mixtral --layout-a ep2-dp2 --layout-b tp2-sp

GPT runs on DeepSpeed ZeRO (layouts ``zero<stage>-dp<N>[-bf16]``); LLaMA and Mixtral run on
megatron-core through the Megatron-style entry ``recipes.megatron.pretrain`` (layouts
``tp<N>-pp<N>-dp<N>-ep<N>[-sp]``, DP inferred from the world size; a ``zero<N>`` token trains the
same model with a DeepSpeed engine at that ZeRO stage, the Megatron-DeepSpeed set-up, e.g.
``--family llama --layout-a tp2-dp2-zero1 --layout-b tp2-pp2``: megatron's optimizer resumes a
DeepSpeed engine's checkpoint). Exits 1 if the resumed losses
leave the uninterrupted ones by more than ``--tolerance`` (relative).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, replace

from recipes.common import compare, write_results
from ucp_plugin.testing.launcher import run_workers


@dataclass(frozen=True)
class Recipe:
    worker: str
    layout_a: str
    layout_b: str
    model: dict
    tolerance: float
    megatron_flags: tuple[str, ...] = ()  # model flags for the Megatron-style entry


LLAMA_FLAGS = ("--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--group-query-attention",
               "--num-query-groups", "2", "--ffn-hidden-size", "128", "--swiglu", "--normalization", "RMSNorm",
               "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights",
               "--seq-length", "64", "--micro-batch-size", "1", "--global-batch-size", "8",
               "--use-distributed-optimizer", "--universal-checkpoint")
FAMILIES = {
    "gpt": Recipe("recipes.gpt.train:train", "zero2-dp4", "zero3-dp2",
                  dict(seq=64, d_model=128, heads=4, layers=4, ffn=512), 1e-5),
    "llama": Recipe("recipes.megatron.pretrain:worker", "tp2-pp2", "tp1-dp4", {}, 1e-5, LLAMA_FLAGS),
    "mixtral": Recipe("recipes.megatron.pretrain:worker", "ep2-dp2", "tp2-sp", {}, 1e-5,
                      LLAMA_FLAGS + ("--num-experts", "4", "--moe-router-topk", "2")),
}
MEGATRON_AXES = {"tp": "--tensor-model-parallel-size", "pp": "--pipeline-model-parallel-size",
                 "ep": "--expert-model-parallel-size", "etp": "--expert-tensor-parallel-size"}


def _axes(layout: str) -> dict[str, int]:
    out = {}
    for token in layout.lower().split("-"):
        for axis in ("dp", "etp", "tp", "pp", "ep"):
            if token.startswith(axis) and token[len(axis):].isdigit():
                out[axis] = int(token[len(axis):])
    return out


def _world(layout: str) -> int:
    a = _axes(layout)
    return a.get("tp", 1) * a.get("pp", 1) * a.get("dp", 1)


def _kwargs(recipe: Recipe, layout: str, steps: int, total: int, save: str | None = None,
            load: str | None = None) -> dict:
    """The worker's arguments for one phase: the DeepSpeed recipe takes a layout string, the
    Megatron-style entry takes Megatron-LM flags."""
    if not recipe.megatron_flags:
        return dict(layout=layout, steps=steps, model=recipe.model, save_dir=save, load_dir=load)
    argv = list(recipe.megatron_flags) + ["--train-iters", str(total)]
    argv += [x for axis, n in _axes(layout).items() if axis in MEGATRON_AXES for x in (MEGATRON_AXES[axis], str(n))]
    argv += ["--sequence-parallel"] if "sp" in layout.lower().split("-") else []
    zero = [t for t in layout.lower().split("-") if t.startswith("zero") and t[4:].isdigit()]
    argv += ["--deepspeed", "--zero-stage", zero[0][4:]] if zero else []
    argv += ["--save", save, "--save-interval", str(total)] if save else []
    argv += ["--load", load] if load else []
    return dict(argv=argv)


def _phase(label: str, layout: str, worker: str, kwargs: dict, steps: int, out: str) -> list[float]:
    """Run one phase on ``layout`` with a live progress bar fed by rank 0's progress file."""
    from tqdm import tqdm

    key = label.split(":")[0].replace("'", "-ref")
    progress = os.path.join(out, f"progress-{key}.jsonl")
    open(progress, "w").close()
    result: dict = {}
    env = {"PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def run():
        try:
            result["value"] = run_workers(_world(layout), worker, {**kwargs, "progress": progress},
                                          timeout=3600, env=env, log_dir=os.path.join(out, "logs", key))
        except Exception as e:  # re-raised in the main thread below
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    with tqdm(total=steps, desc=f"{label:<28}", unit="step", file=sys.stdout) as bar:
        while thread.is_alive():
            thread.join(0.5)
            with open(progress) as f:
                lines = [json.loads(x) for x in f if x.strip()]
            bar.update(len(lines) - bar.n)
            if lines:
                bar.set_postfix(loss=f"{lines[-1]['loss']:.4f}")
    if "error" in result:
        raise result["error"]
    return result["value"][0]["losses"]


def run(family: str, layout_a: str, layout_b: str, steps: int, resume_steps: int, out: str,
        tolerance: float | None = None, model: dict | None = None) -> int:
    recipe = FAMILIES[family]
    recipe = replace(recipe, model={**recipe.model, **(model or {})})
    tol = recipe.tolerance if tolerance is None else tolerance
    ckpt = os.path.join(out, "checkpoint")
    total = steps + resume_steps
    t0 = time.time()
    before = _phase(f"A: train on {layout_a}", layout_a, recipe.worker,
                    _kwargs(recipe, layout_a, steps, steps, save=ckpt), steps, out)
    resumed = _phase(f"B: resume on {layout_b}", layout_b, recipe.worker,
                     _kwargs(recipe, layout_b, resume_steps, total, load=ckpt), resume_steps, out)
    reference = _phase(f"A': uninterrupted {layout_a}", layout_a, recipe.worker,
                       _kwargs(recipe, layout_a, total, total), total, out)
    cmp = compare(resumed, reference[steps:], tol)
    paths = write_results(out, before, resumed, reference, dict(
        family=family, layout_a=layout_a, layout_b=layout_b, max_rel_diff=cmp.max_rel_diff, tolerance=tol))
    from ucp_plugin.tools.inspect import render, report
    print("\n" + render(report(ckpt)))
    print(f"\nlosses: {paths['csv']}\nplot:   {paths['png']}\ncheckpoint: {ckpt}")
    print(f"resumed on {layout_b} vs uninterrupted on {layout_a}: max relative loss difference "
          f"{cmp.max_rel_diff:.2e} over {cmp.steps} steps (tolerance {tol:.0e}) -> "
          f"{'OK' if cmp.ok else 'MISMATCH'}  [{time.time() - t0:.0f} s]")
    return 0 if cmp.ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="gpt")
    ap.add_argument("--layout-a", help="layout that trains and saves (default per family)")
    ap.add_argument("--layout-b", help="layout that resumes (default per family)")
    ap.add_argument("--steps", type=int, default=20, help="steps on layout A before the save")
    ap.add_argument("--resume-steps", type=int, default=10, help="steps on layout B after the resume")
    ap.add_argument("--out", default="runs/main")
    ap.add_argument("--tolerance", type=float)
    a = ap.parse_args(argv)
    recipe = FAMILIES[a.family]
    out = os.path.abspath(os.path.join(a.out, a.family))
    if os.path.exists(os.path.join(out, "checkpoint")):
        import shutil
        shutil.rmtree(os.path.join(out, "checkpoint"))
    os.makedirs(out, exist_ok=True)
    return run(a.family, a.layout_a or recipe.layout_a, a.layout_b or recipe.layout_b, a.steps, a.resume_steps,
               out, a.tolerance)


if __name__ == "__main__":
    sys.exit(main())
