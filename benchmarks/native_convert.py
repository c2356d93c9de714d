"""Offline conversion of a native DeepSpeed checkpoint: ``ucp convert`` against DeepSpeed's own
``python -m deepspeed.checkpoint.ds_to_universal`` on the same checkpoint.

Trains a TinyGPT (``tests/ds_harness``) one step at ZeRO-2 (or 3) on DP2 and saves it natively, then
runs each converter as a subprocess while sampling every 20 ms: the summed RSS of the converter's
process tree (workers included) and the bytes under its output folder (ds_to_universal's temporary
``tmp/`` lies there). Prints a table and writes ``--json``.

    python benchmarks/native_convert.py --d 252 --layers 8 --vocab 32000 --stage 2
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def make_checkpoint(root: str, stage: int, model: dict) -> str:
    from tests.ds_harness import ds_config
    from ucp_plugin.testing.launcher import run_workers
    env = {"PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    run_workers(2, "tests.ds_harness:train_many", {"runs": [dict(config=ds_config(stage, "fp32", 2), steps=1,
                save_dir=os.path.join(root, "native"), model=model)]}, timeout=1800, env=env,
                log_dir=os.path.join(root, "log"))
    return os.path.join(root, "native", "global_step1")


def du(path: str) -> int:
    total = 0
    for base, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(base, f))
            except OSError:
                pass  # removed while walking
    return total


def measure(cmd: list[str], out: str) -> dict:
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root, peak_rss, peak_disk = psutil.Process(proc.pid), 0, 0
    while proc.poll() is None:
        try:
            procs = [root] + root.children(recursive=True)
            peak_rss = max(peak_rss, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        peak_disk = max(peak_disk, du(out))
        time.sleep(0.02)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed: {proc.stderr.read().decode()[-2000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(peak_rss / 2**20, 1),
            "peak_extra_disk_mib": round(peak_disk / 2**20, 1), "final_disk_mib": round(du(out) / 2**20, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=252)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=1008)
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--json", default="benchmarks/native_convert.json")
    a = p.parse_args()
    root = tempfile.mkdtemp(prefix="ucp-conv-bench-")
    try:
        ckpt = make_checkpoint(root, a.stage, dict(d=a.d, layers=a.layers, vocab=a.vocab, hidden=a.hidden))
        size = du(ckpt)
        rows = {}
        for w in a.workers:
            out = os.path.join(root, f"ucp_w{w}")
            rows[f"ucp convert --workers {w}"] = measure(
                [sys.executable, "-m", "ucp_plugin.cli.main", "convert", ckpt, out, "--workers", str(w)], out)
        out = os.path.join(root, "ds_universal")
        rows["ds_to_universal"] = measure([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                                           "--input_folder", ckpt, "--output_folder", out,
                                           "--inject_missing_state"], out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {"checkpoint_mib": round(size / 2**20, 1), "stage": a.stage, "dp": 2,
              "model": {"d": a.d, "layers": a.layers, "vocab": a.vocab, "hidden": a.hidden}, "runs": rows}
    print(f"native ZeRO-{a.stage} DP2 checkpoint: {result['checkpoint_mib']} MiB")
    print(f"{'converter':<26}{'wall s':>8}{'peak RSS MiB':>14}{'peak disk MiB':>15}{'final MiB':>11}")
    for name, r in rows.items():
        print(f"{name:<26}{r['wall_s']:>8}{r['peak_rss_mib']:>14}{r['peak_extra_disk_mib']:>15}{r['final_disk_mib']:>11}")
    with open(a.json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
