"""Offline conversion of a native DeepSpeed checkpoint: ``ucp convert`` against DeepSpeed's own
``python -m deepspeed.checkpoint.ds_to_universal`` on the same checkpoint.

Trains a TinyGPT (``tests/ds_harness``) one step at ZeRO-2 (or 3) on DP2 and saves it natively, then
runs each converter ``--repeats`` times as a subprocess while sampling every 20 ms: the summed RSS of
the converter's process tree (workers included) and the bytes under its output folder
(ds_to_universal's temporary ``tmp/`` lies there); the CPU seconds of the tree come from ``wait4``.
Fair terms: before every run the input files leave the page cache (``posix_fadvise(DONTNEED)``, after
an fsync of everything written so far), and ds_to_universal's output is fsynced inside its timed span
(``ucp convert`` fsyncs its files itself), so both end durable. Reports medians (walls of every run
kept), prints a table and writes ``--json`` with the load average before and after.

    python benchmarks/native_convert.py --d 378 --hidden 1512 --layers 8 --vocab 32000 --stage 2
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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


DS_DURABLE = """
import os, runpy, sys
out = sys.argv[sys.argv.index("--output_folder") + 1]
runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__", alter_sys=True)
for base, _, files in os.walk(out):  # durable, as ucp convert's output is
    for name in files + ["."]:
        fd = os.open(os.path.join(base, name), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
"""


def drop_cache(folder: str) -> None:
    """The files of ``folder`` out of the page cache, so every run reads its input cold."""
    os.sync()  # dirty pages (earlier outputs) cannot be dropped
    for name in os.listdir(folder):
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def measure(cmd: list[str], out: str, ckpt: str) -> dict:
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    shutil.rmtree(out, ignore_errors=True)
    drop_cache(ckpt)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root, peak_rss, peak_disk = psutil.Process(proc.pid), 0, 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # rusage: the tree's CPU time
        if pid:
            break
        try:
            procs = [root] + root.children(recursive=True)
            peak_rss = max(peak_rss, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        peak_disk = max(peak_disk, du(out))
        time.sleep(0.02)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed with exit code {proc.returncode}")
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mib": round(peak_rss / 2**20, 1), "peak_extra_disk_mib": round(peak_disk / 2**20, 1),
            "final_disk_mib": round(du(out) / 2**20, 1)}


def median_of(cmd: list[str], out: str, ckpt: str, repeats: int) -> dict:
    runs = [measure(cmd, out, ckpt) for _ in range(repeats)]
    row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return {**row, "walls_s": [r["wall_s"] for r in runs]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=378)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=1512)
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3, help="runs per converter (medians reported)")
    p.add_argument("--json", default="benchmarks/native_convert.json")
    a = p.parse_args()
    root = tempfile.mkdtemp(prefix="ucp-conv-bench-")
    load_before = os.getloadavg()
    try:
        ckpt = make_checkpoint(root, a.stage, dict(d=a.d, layers=a.layers, vocab=a.vocab, hidden=a.hidden))
        size = du(ckpt)
        rows = {}
        for w in a.workers:
            out = os.path.join(root, f"ucp_w{w}")
            rows[f"ucp convert --workers {w}"] = median_of(
                [sys.executable, "-m", "ucp_plugin.cli.main", "convert", ckpt, out, "--workers", str(w)], out, ckpt,
                a.repeats)
        out = os.path.join(root, "ds_universal")
        rows["ds_to_universal"] = median_of([sys.executable, "-c", DS_DURABLE, "--input_folder", ckpt,
                                             "--output_folder", out, "--inject_missing_state"], out, ckpt, a.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {"checkpoint_mib": round(size / 2**20, 1), "stage": a.stage, "dp": 2,
              "model": {"d": a.d, "layers": a.layers, "vocab": a.vocab, "hidden": a.hidden},
              "repeats": a.repeats, "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "runs": rows}
    print(f"native ZeRO-{a.stage} DP2 checkpoint: {result['checkpoint_mib']} MiB; load {load_before} -> "
          f"{result['loadavg_after']}")
    print(f"{'converter':<26}{'wall s':>8}{'CPU s':>7}{'peak RSS MiB':>14}{'peak disk MiB':>15}{'final MiB':>11}")
    for name, r in rows.items():
        print(f"{name:<26}{r['wall_s']:>8}{r['cpu_s']:>7}{r['peak_rss_mib']:>14}{r['peak_extra_disk_mib']:>15}"
              f"{r['final_disk_mib']:>11}")
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
