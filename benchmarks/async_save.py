"""How long ``engine.save_checkpoint`` blocks training, synchronous vs asynchronous universal save,
and what saving every K steps costs the training throughput (DeepSpeed ZeRO-2, fp32, gloo, CPU).

One launch of ``--dp`` ranks trains a GPT-like model (``recipes.gpt.model``) three times from the
same start, ``--steps`` steps each: without saves, with a synchronous save every ``--every`` steps,
with an asynchronous one (``"checkpoint": {"universal": true, "async": true}``; ``ucp_plugin.poll()``
at every step boundary, ``ucp_plugin.wait()`` after the last step). Before each timed run one step
and, in the saving runs, one save warm up (the first asynchronous save allocates the staging
buffer). Reported per mode: each save call's blocking time (the slowest rank's), the loop's wall
time and its throughput relative to no saves, and for async the final ``wait``.

    python benchmarks/async_save.py                       # ~125M parameters, DP4
    python benchmarks/async_save.py --d-model 512 --layers 8 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("none", "sync", "async")


def ds_config(dp: int, mode: str) -> dict:
    checkpoint = {"universal": True, **({"async": True} if mode == "async" else {})}
    return {"train_batch_size": dp, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
            "zero_optimization": {"stage": 2}, "checkpoint": checkpoint, "steps_per_print": 10**9}


def _step(engine, tokens: torch.Tensor) -> None:
    loss = engine(tokens[:, :-1], tokens[:, 1:])
    engine.backward(loss)
    engine.step()


def run_mode(mode: str, model: dict, steps: int, every: int, root: str) -> dict:
    """One timed run on this rank: per-save blocking seconds, loop seconds, final wait seconds."""
    import deepspeed
    import torch.distributed as dist

    import ucp_plugin
    from recipes.gpt.model import GPT, GPTConfig

    cfg = GPTConfig(**model)
    torch.manual_seed(0)
    engine, *_ = deepspeed.initialize(model=GPT(cfg), config=ds_config(dist.get_world_size(), mode),
                                      model_parameters=None)
    g = torch.Generator().manual_seed(dist.get_rank())
    tokens = torch.randint(0, cfg.vocab, (1, cfg.seq + 1), generator=g)
    save_dir = os.path.join(root, mode)

    def save() -> float:
        dist.barrier()  # every rank starts the call together: the time is the call's own
        start = time.perf_counter()
        engine.save_checkpoint(save_dir, tag="bench")
        return time.perf_counter() - start

    _step(engine, tokens)
    warm = save() if mode != "none" else None
    ucp_plugin.wait()
    blocked = []
    dist.barrier()
    loop_start, cpu_start = time.perf_counter(), _cpu()
    polled = 0.0  # time in poll(): the all-reduce, and the commit when every rank is done
    for i in range(1, steps + 1):
        _step(engine, tokens)
        if mode != "none" and i % every == 0:
            blocked.append(save())
        start = time.perf_counter()
        ucp_plugin.poll()
        polled += time.perf_counter() - start
    loop = time.perf_counter() - loop_start
    start = time.perf_counter()
    ucp_plugin.wait()
    drain = time.perf_counter() - start
    cpu = _cpu() - cpu_start  # training + every save's work (the writer thread's included, drain too)
    engine.destroy()
    return {"warm_save": warm, "blocked": blocked, "loop": loop, "drain": drain, "polled": polled, "cpu": cpu}


def _cpu() -> float:
    """CPU seconds of this process, all threads: what a run costs whatever else loads the machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(model: dict, steps: int, every: int, root: str, modes: list[str]) -> dict:
    import importlib
    import sys

    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # skip the 50 s shm-op build
    import deepspeed

    import ucp_plugin.deepspeed  # noqa: F401  (enables "checkpoint": {"universal": true})
    deepspeed.init_distributed(dist_backend="gloo")
    return {mode: run_mode(mode, model, steps, every, root) for mode in modes}


def summarize(per_rank: list[dict], model: dict, dp: int, steps: int, every: int, numel: int) -> dict:
    out = {"model": model, "params": numel, "dp": dp, "steps": steps, "every": every, "modes": {}}
    for mode in per_rank[0]:
        runs = [r[mode] for r in per_rank]
        blocked = [max(r["blocked"][i] for r in runs) for i in range(len(runs[0]["blocked"]))]
        out["modes"][mode] = {"blocked_s": blocked, "warm_save_s": max(r["warm_save"] or 0 for r in runs),
                              "loop_s": max(r["loop"] for r in runs), "drain_s": max(r["drain"] for r in runs),
                              "poll_s": max(r["polled"] for r in runs), "cpu_s": sum(r["cpu"] for r in runs)}
    base = out["modes"].get("none")
    for mode, m in out["modes"].items():
        m["steps_per_s"] = steps / m["loop_s"]
        m["throughput_vs_none"] = base["loop_s"] / m["loop_s"] if base else None
        # with every core busy training (as here), throughput goes as 1 / CPU seconds per step
        m["cpu_throughput_vs_none"] = base["cpu_s"] / m["cpu_s"] if base else None
        m["mean_blocked_s"] = sum(m["blocked_s"]) / len(m["blocked_s"]) if m["blocked_s"] else 0.0
    if {"sync", "async"} <= set(out["modes"]):
        out["async_blocking_vs_sync"] = out["modes"]["async"]["mean_blocked_s"] / out["modes"]["sync"]["mean_blocked_s"]
    return out


def report(s: dict) -> None:
    print(f"GPT-like model, {s['params'] / 1e6:.1f}M parameters {s['model']}, DeepSpeed ZeRO-2 fp32 DP{s['dp']}, "
          f"{s['steps']} steps, a save every {s['every']} steps")
    print(f"{'mode':6} {'save blocks (s, each call)':34} {'mean':>7} {'loop s':>8} {'steps/s':>8} "
          f"{'vs none':>8} {'in poll':>8} {'final wait':>10} {'CPU s':>7} {'CPU vs none':>11}")
    for mode, m in s["modes"].items():
        calls = " ".join(f"{b:.2f}" for b in m["blocked_s"]) or "-"
        print(f"{mode:6} {calls:34} {m['mean_blocked_s']:7.2f} {m['loop_s']:8.1f} {m['steps_per_s']:8.3f} "
              f"{m['throughput_vs_none']:8.1%} {m['poll_s']:8.2f} {m['drain_s']:10.2f} {m['cpu_s']:7.1f} "
              f"{m['cpu_throughput_vs_none']:11.1%}")
    if "async_blocking_vs_sync" in s:
        print(f"async save blocks {s['async_blocking_vs_sync']:.1%} of the sync save's time (warm-up saves: sync "
              f"{s['modes']['sync']['warm_save_s']:.2f} s, async {s['modes']['async']['warm_save_s']:.2f} s)")


def main(argv=None) -> None:
    from recipes.gpt.model import GPT, GPTConfig
    from ucp_plugin.testing.launcher import run_workers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dp", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--layers", type=int, default=18)  # 18 x GPT-2-small blocks ~ 125M with a byte vocabulary
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--root", default=None, help="where checkpoints go (default: a temporary folder)")
    ap.add_argument("--json", default="async_save.json")
    a = ap.parse_args(argv)
    model = dict(d_model=a.d_model, heads=a.d_model // 64, layers=a.layers, ffn=4 * a.d_model, seq=a.seq)
    numel = sum(p.numel() for p in GPT(GPTConfig(**model)).parameters())
    root = a.root or tempfile.mkdtemp(prefix="ucp-async-bench-")
    env = {"PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    try:
        per_rank = run_workers(a.dp, "benchmarks.async_save:worker",
                               {"model": model, "steps": a.steps, "every": a.every, "root": root,
                                "modes": a.modes.split(",")}, timeout=7200, env=env)
    finally:
        if a.root is None:
            shutil.rmtree(root, ignore_errors=True)
    s = summarize(per_rank, model, a.dp, a.steps, a.every, numel)
    report(s)
    with open(a.json, "w") as f:
        json.dump(s, f, indent=1)


if __name__ == "__main__":
    main()
