"""The main job: train a model family on layout A, save a universal checkpoint, resume on layout B
in fresh processes, compare with an uninterrupted run on A, write losses (CSV/JSON) and a plot.

    python3 -m recipes.main --family gpt --layout-a zero2-dp4 --layout-b zero3-dp2

Exits 1 if the resumed losses leave the uninterrupted ones by more than ``--tolerance`` (relative).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

from recipes.common import compare, write_results
from ucp_plugin.launcher import run_workers

FAMILIES = {
    # family: (worker, default layout A, default layout B, model config, tolerance)
    "gpt": ("recipes.gpt.train:train", "zero2-dp4", "zero3-dp2",
            dict(seq=64, d_model=128, heads=4, layers=4, ffn=512), 1e-5),
}


def _world(layout: str) -> int:
    size = 1
    for token in layout.lower().split("-"):
        for axis in ("dp", "tp", "pp"):
            if token.startswith(axis) and token[len(axis):].isdigit():
                size *= int(token[len(axis):])
    return size


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
    worker, _, _, default_model, default_tol = FAMILIES[family]
    model = {**default_model, **(model or {})}
    tol = default_tol if tolerance is None else tolerance
    ckpt = os.path.join(out, "checkpoint")
    t0 = time.time()
    before = _phase(f"A: train on {layout_a}", layout_a, worker,
                    dict(layout=layout_a, steps=steps, model=model, save_dir=ckpt), steps, out)
    resumed = _phase(f"B: resume on {layout_b}", layout_b, worker,
                     dict(layout=layout_b, steps=resume_steps, model=model, load_dir=ckpt), resume_steps, out)
    reference = _phase(f"A': uninterrupted {layout_a}", layout_a, worker,
                       dict(layout=layout_a, steps=steps + resume_steps, model=model), steps + resume_steps, out)
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
    ap.add_argument("--layout-a")
    ap.add_argument("--layout-b")
    ap.add_argument("--steps", type=int, default=20, help="steps on layout A before the save")
    ap.add_argument("--resume-steps", type=int, default=10, help="steps on layout B after the resume")
    ap.add_argument("--out", default="runs/main")
    ap.add_argument("--tolerance", type=float)
    a = ap.parse_args(argv)
    _, default_a, default_b, _, _ = FAMILIES[a.family]
    out = os.path.abspath(os.path.join(a.out, a.family))
    if os.path.exists(os.path.join(out, "checkpoint")):
        import shutil
        shutil.rmtree(os.path.join(out, "checkpoint"))
    os.makedirs(out, exist_ok=True)
    return run(a.family, a.layout_a or default_a, a.layout_b or default_b, a.steps, a.resume_steps, out,
               a.tolerance)


if __name__ == "__main__":
    sys.exit(main())
