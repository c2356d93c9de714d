"""How long ``engine.save_checkpoint`` blocks training, synchronous vs asynchronous universal save,
and what saving every K steps costs the training throughput (DeepSpeed ZeRO-2, fp32, gloo, CPU).

One launch of ``--dp`` ranks builds ONE engine (GPT-like model, ``recipes.gpt.model``) and trains it
in blocks of ``--every`` steps; the modes take turns block by block, so a change of the machine's
load falls on every mode alike (each round runs every mode once, in an order rotated per round):
- ``none``: ``--every`` steps;
- ``sync``: a synchronous universal save, then ``--every`` steps;
- ``async``: an asynchronous save (``"checkpoint": {"async": true}``, toggled in the engine's config
  between blocks), then ``--every`` steps with ``ucp_plugin.poll()`` at each step boundary, then
  ``ucp_plugin.wait()``: a block holds one save's whole cost, the final wait (drain) included;
- ``async_nice0``: the same with the writer thread at the process's own priority (nice 0).
A warm-up step and one save of each kind run first (the first asynchronous save allocates the
staging buffer). Per block and rank: wall time; CPU time of the process, of the training thread and
of the writer thread (user and system time from ``/proc/self/task/<tid>/stat``); each save call's
blocking time after a barrier. Throughput relative to ``none`` by wall time and by CPU time (with
every core busy training, as on a small machine, throughput goes as 1 / CPU seconds per step).
At the end rank 0 times the two SHA-256 passes a save makes over its shard (the chunk digests and
the whole file's), to split the writer's CPU time.

    python benchmarks/async_save.py                        # ~125M parameters, DP4, 20 steps per mode
    python benchmarks/async_save.py --d-model 256 --layers 2 --rounds 1 --json runs/smoke.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import tempfile
import threading
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("none", "sync", "async")
SAVING = ("sync", "async", "async_nice0")
TICK = os.sysconf("SC_CLK_TCK")
NICE = 10  # the product's WRITER_NICE, restored after an async_nice0 block (checked in main)


def ds_config(dp: int) -> dict:
    return {"train_batch_size": dp, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
            "zero_optimization": {"stage": 2}, "checkpoint": {"universal": True, "async": False},
            "steps_per_print": 10**9}


def thread_cpu(tid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of thread ``tid`` of this process."""
    with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK  # utime, stime: fields 14 and 15 of stat


def process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class WriterClock:
    """Records each writer thread's CPU time when it ends (patches ``PendingSave._run``)."""

    def __init__(self):
        from ucp_plugin import async_save

        self.done: list[tuple[float, float, int]] = []
        run = async_save.PendingSave._run

        def timed(pending) -> None:
            try:
                run(pending)
            finally:
                tid = threading.get_native_id()
                self.done.append((*thread_cpu(tid), os.getpriority(os.PRIO_PROCESS, tid)))
        async_save.PendingSave._run = timed

    def take(self) -> tuple[float, float, list[int]]:
        """(user, system) CPU seconds of the writers that ended since the last take, their nice values."""
        user, system = sum(d[0] for d in self.done), sum(d[1] for d in self.done)
        nice = [d[2] for d in self.done]
        self.done.clear()
        return user, system, nice


def _step(engine, tokens: torch.Tensor) -> None:
    loss = engine(tokens[:, :-1], tokens[:, 1:])
    engine.backward(loss)
    engine.step()


def _save(engine, root: str, mode: str) -> float:
    """One save call in ``mode``; the seconds it blocked this rank (after a barrier)."""
    import torch.distributed as dist

    from ucp_plugin import async_save

    engine._config._param_dict["checkpoint"]["async"] = mode != "sync"
    async_save.WRITER_NICE = 0 if mode == "async_nice0" else NICE
    dist.barrier()
    start = time.perf_counter()
    engine.save_checkpoint(os.path.join(root, mode), tag="bench")
    return time.perf_counter() - start


def run_block(engine, tokens, mode: str, every: int, root: str, clock: WriterClock) -> dict:
    """One block on this rank: the save (if any), ``every`` steps, the final wait."""
    import torch.distributed as dist

    import ucp_plugin

    main = threading.get_native_id()
    dist.barrier()
    wall, cpu, (user, system) = time.perf_counter(), process_cpu(), thread_cpu(main)
    blocked = _save(engine, root, mode) if mode in SAVING else None
    polled = 0.0  # time in poll(): one all-reduce, and the commit when every rank is done
    for _ in range(every):
        _step(engine, tokens)
        start = time.perf_counter()
        ucp_plugin.poll()
        polled += time.perf_counter() - start
    start = time.perf_counter()
    ucp_plugin.wait()
    drain = time.perf_counter() - start
    end_user, end_system = thread_cpu(main)
    w_user, w_system, nice = clock.take()
    return {"mode": mode, "wall": time.perf_counter() - wall, "cpu": process_cpu() - cpu,
            "train_user": end_user - user, "train_sys": end_system - system,
            "writer_user": w_user, "writer_sys": w_system, "writer_nice": nice, "blocked": blocked, "drain": drain, "poll": polled}


def hash_split(root: str) -> dict:
    """CPU seconds of the two SHA-256 passes a save makes over rank 0's shard (read back first)."""
    from ucp_plugin.storage.writer import CHUNK_ELEMS

    path = os.path.join(root, "sync", "bench", "shards", "rank-00000.safetensors")
    with open(path, "rb") as f:
        data = memoryview(f.read())
    start = time.thread_time()
    hashlib.sha256(data).digest()
    whole = time.thread_time() - start
    step = CHUNK_ELEMS * 4
    start = time.thread_time()
    for i in range(0, len(data), step):
        hashlib.sha256(data[i:i + step]).digest()
    return {"shard_bytes": len(data), "whole_sha256_cpu_s": whole, "chunk_sha256_cpu_s": time.thread_time() - start}


def worker(model: dict, rounds: int, every: int, root: str, modes: list[str]) -> dict:
    import importlib
    import sys

    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # skip the 50 s shm-op build
    import deepspeed
    import torch.distributed as dist

    import ucp_plugin
    import ucp_plugin.deepspeed  # noqa: F401  (enables "checkpoint": {"universal": true})
    from recipes.gpt.model import GPT, GPTConfig

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = GPTConfig(**model)
    torch.manual_seed(0)
    engine, *_ = deepspeed.initialize(model=GPT(cfg), config=ds_config(dist.get_world_size()), model_parameters=None)
    tokens = torch.randint(0, cfg.vocab, (1, cfg.seq + 1), generator=torch.Generator().manual_seed(dist.get_rank()))
    clock = WriterClock()
    _step(engine, tokens)
    warm = {}
    for mode in ("sync", "async"):
        warm[mode] = _save(engine, root, mode)
        ucp_plugin.wait()
    clock.take()  # the warm-up saves' writers are not a block's
    blocks = []
    for r in range(rounds):
        for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
            blocks.append({"round": r, **run_block(engine, tokens, mode, every, root, clock)})
    out = {"warm_save_s": warm, "blocks": blocks}
    if dist.get_rank() == 0 and "sync" in modes:
        out["hash"] = hash_split(root)
    engine.destroy()
    return out


def _mode_totals(blocks: list[list[dict]], mode: str, every: int) -> dict:
    """Totals of ``mode``'s blocks: per block, wall/blocking is the slowest rank's, CPU sums ranks."""
    mine = [[b for b in rank if b["mode"] == mode] for rank in blocks]
    n = len(mine[0])
    per_block = [[rank[i] for rank in mine] for i in range(n)]
    total = {k: sum(sum(b[k] for b in blk) for blk in per_block)
             for k in ("cpu", "train_user", "train_sys", "writer_user", "writer_sys")}
    total.update(wall=sum(max(b["wall"] for b in blk) for blk in per_block),
                 drain=sum(max(b["drain"] for b in blk) for blk in per_block),
                 poll=sum(max(b["poll"] for b in blk) for blk in per_block))
    blocked = [max(b["blocked"] for b in blk) for blk in per_block] if mode in SAVING else []
    nice = sorted({n for blk in per_block for b in blk for n in b["writer_nice"]})
    return {"steps": n * every, "saves": len(blocked), "blocked_s": blocked, "writer_nice": nice,
            "mean_blocked_s": sum(blocked) / len(blocked) if blocked else 0.0,
            "round_cpu_s": [sum(b["cpu"] for b in blk) for blk in per_block],
            "round_wall_s": [max(b["wall"] for b in blk) for blk in per_block],
            **{f"{k}_s": v for k, v in total.items()}}


def summarize(per_rank: list[dict], model: dict, dp: int, rounds: int, every: int, numel: int, modes) -> dict:
    blocks = [r["blocks"] for r in per_rank]
    out = {"model": model, "params": numel, "dp": dp, "rounds": rounds, "every": every,
           "warm_save_s": {m: max(r["warm_save_s"][m] for r in per_rank) for m in ("sync", "async")},
           "hash": per_rank[0].get("hash"), "modes": {m: _mode_totals(blocks, m, every) for m in modes}}
    base = out["modes"].get("none")
    for m in out["modes"].values():
        m["steps_per_s"] = m["steps"] / m["wall_s"]
        if base:
            m["throughput_vs_none"] = base["wall_s"] / m["wall_s"]
            m["cpu_throughput_vs_none"] = base["cpu_s"] / m["cpu_s"]
            m["round_cpu_throughput_vs_none"] = [b / c for b, c in zip(base["round_cpu_s"], m["round_cpu_s"])]
        if m["saves"]:
            m["writer_cpu_per_shard_s"] = (m["writer_user_s"] + m["writer_sys_s"]) / (m["saves"] * dp)
    if "sync" in out["modes"]:
        sync = out["modes"]["sync"]["mean_blocked_s"]
        out["blocking_vs_sync"] = {m: out["modes"][m]["mean_blocked_s"] / sync for m in modes if m.startswith("async")}
    return out


def report(s: dict) -> None:
    print(f"GPT-like model, {s['params'] / 1e6:.1f}M parameters {s['model']}, DeepSpeed ZeRO-2 fp32 DP{s['dp']}, "
          f"{s['rounds']} rounds of {s['every']}-step blocks per mode, one save per saving block")
    print(f"{'mode':12} {'save blocks (s, each)':28} {'mean':>6} {'wall s':>7} {'vs none':>8} {'CPU s':>7} "
          f"{'CPU vs none':>11} {'per round':>18} {'train u/s':>11} {'writer u/s':>11} {'drain':>6} {'poll':>6}")
    for mode, m in s["modes"].items():
        calls = " ".join(f"{b:.2f}" for b in m["blocked_s"]) or "-"
        rounds = "/".join(f"{x:.0%}" for x in m.get("round_cpu_throughput_vs_none", []))
        print(f"{mode:12} {calls:28} {m['mean_blocked_s']:6.2f} {m['wall_s']:7.1f} "
              f"{m.get('throughput_vs_none', 1):8.1%} {m['cpu_s']:7.1f} {m.get('cpu_throughput_vs_none', 1):11.1%} "
              f"{rounds:>18} {m['train_user_s']:5.1f}/{m['train_sys_s']:<5.1f} "
              f"{m['writer_user_s']:5.1f}/{m['writer_sys_s']:<5.1f} {m['drain_s']:6.2f} {m['poll_s']:6.2f}")
    for mode, ratio in s.get("blocking_vs_sync", {}).items():
        m = s["modes"][mode]
        print(f"{mode} save blocks {ratio:.1%} of the sync save's time; writer "
              f"{m['writer_cpu_per_shard_s']:.2f} CPU s per shard, at nice {m['writer_nice']}")
    if s["hash"]:
        h = s["hash"]
        print(f"rank 0 shard {h['shard_bytes'] / 1e6:.0f} MB: whole-file SHA-256 {h['whole_sha256_cpu_s']:.2f} CPU s, "
              f"chunk SHA-256 {h['chunk_sha256_cpu_s']:.2f} CPU s; warm-up saves {s['warm_save_s']}")


def main(argv=None) -> None:
    from recipes.gpt.model import GPT, GPTConfig
    from ucp_plugin import async_save
    from ucp_plugin.testing.launcher import run_workers

    if async_save.WRITER_NICE != NICE:
        raise SystemExit(f"benchmarks/async_save.py: NICE={NICE} but the product's WRITER_NICE is "
                         f"{async_save.WRITER_NICE}; update NICE")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dp", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--layers", type=int, default=18)  # 18 x GPT-2-small blocks ~ 125M with a byte vocabulary
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4, help="blocks per mode (steps per mode = rounds x every)")
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--modes", default=",".join(MODES), help=f"of none,{','.join(SAVING)}")
    ap.add_argument("--root", default=None, help="where checkpoints go (default: a temporary folder)")
    ap.add_argument("--json", default=os.path.join(REPO, "benchmarks", "async_save.json"))
    a = ap.parse_args(argv)
    modes = a.modes.split(",")
    unknown = set(modes) - {"none", *SAVING}
    if unknown:
        ap.error(f"--modes: unknown {sorted(unknown)}; use none,{','.join(SAVING)}")
    model = dict(d_model=a.d_model, heads=a.d_model // 64, layers=a.layers, ffn=4 * a.d_model, seq=a.seq)
    numel = sum(p.numel() for p in GPT(GPTConfig(**model)).parameters())
    root = a.root or tempfile.mkdtemp(prefix="ucp-async-bench-")
    load_before = open("/proc/loadavg").read().split()[:3]
    env = {"PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    try:
        per_rank = run_workers(a.dp, "benchmarks.async_save:worker",
                               {"model": model, "rounds": a.rounds, "every": a.every, "root": root,
                                "modes": modes}, timeout=7200, env=env)
    finally:
        if a.root is None:
            shutil.rmtree(root, ignore_errors=True)
    s = summarize(per_rank, model, a.dp, a.rounds, a.every, numel, modes)
    s["loadavg_before"], s["loadavg_after"] = load_before, open("/proc/loadavg").read().split()[:3]
    report(s)
    print(f"load average before {' '.join(load_before)}, after {' '.join(s['loadavg_after'])}")
    with open(a.json, "w") as f:
        json.dump(s, f, indent=1)


if __name__ == "__main__":
    main()
