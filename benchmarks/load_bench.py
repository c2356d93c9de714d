"""Save and load of real models, side by side: ucp_plugin against DeepSpeed's native checkpoints,
DeepSpeed's own UCP (``ds_to_universal`` + ``load_universal``) and megatron's ``dist_checkpointing``.

A GPT-like model (``recipes/gpt/model.py`` at GPT-2 small or medium size), fp32, torch AdamW, DeepSpeed
ZeRO-2, trained one step at DP4 and saved both ways; then loaded at DP4 (plugin vs native), DP2 and
DP3 (plugin vs ``load_universal``). Every figure is a median over ``--reps`` repetitions in which the
two sides alternate (A B, B A, ...), so load from other processes on the machine hits both.

Fairness: both saves are made durable (every file of the folder fsynced, inside the timed span; the
plugin already fsyncs its own); before every load and conversion the page cache of every checkpoint
file is dropped (fsync, then ``posix_fadvise(DONTNEED)``), so each load reads from disk. Each load
of a phase goes into the same engine (built once per process: building one per load costs more than
the loads here), after one untimed load so that every timed load finds the optimizer states already
allocated; the timed span is ``engine.load_checkpoint`` between two barriers. Peak RSS is the rank's
VmHWM during the load (reset through ``/proc/self/clear_refs`` right before it, so it includes the
engine itself);
bytes read are the plugin's own accounting and ``/proc/self/io`` (``rchar``: bytes returned by read
calls: ``torch.load`` and the plugin's ``preadv`` alike).
Each load is checked: the engine's weights, fp32 master and optimizer states are zeroed before it
(untimed), and after it the weights and optimizer state sums must equal the saved ones.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/load_bench.py --size 125m
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.load_report import markdown, med, print_report, targets  # noqa: E402

SIZES = {  # GPT-2 small and medium shapes (tied embedding, 1024 positions)
    "125m": dict(vocab=50257, seq=1024, d_model=768, heads=12, layers=12, ffn=3072),
    "350m": dict(vocab=50257, seq=1024, d_model=1024, heads=16, layers=24, ffn=4096),
    "40m": dict(vocab=32000, seq=1024, d_model=512, heads=8, layers=8, ffn=2048),
    "smoke": dict(vocab=1000, seq=64, d_model=64, heads=4, layers=2, ffn=256),  # checks the script only
}
TOKENS = 32  # sequence length of the one training step (the step only has to create Adam states)
TAG = "bench"


# ---------------------------------------------------------------- helpers used by every process

def drop_cache(root: str) -> int:
    """fsync every file under ``root`` and drop it from the page cache; returns the bytes dropped."""
    total = 0
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return total


def fsync_share(root: str, rank: int, world: int) -> None:
    """fsync this rank's share of the files under ``root`` and every directory (durability)."""
    files, dirs = [], []
    for folder, _, names in os.walk(root):
        dirs.append(folder)
        files += [os.path.join(folder, n) for n in names]
    for path in sorted(files)[rank::world] + sorted(dirs)[rank::world]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def proc_io() -> dict:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}


def profiled(fn, label: str):
    """``fn``, run under cProfile on rank 0 when UCP_BENCH_PROFILE names a folder (stats written there
    as ``<label>-<n>.prof``; the timing of a profiled run is not comparable)."""
    folder = os.environ.get("UCP_BENCH_PROFILE")
    if not folder or os.environ.get("RANK") != "0":
        return fn

    def run():
        import cProfile
        os.makedirs(folder, exist_ok=True)
        n = len([f for f in os.listdir(folder) if f.startswith(label + "-")])
        with cProfile.Profile() as prof:
            fn()
        prof.dump_stats(os.path.join(folder, f"{label}-{n}.prof"))
    return run


def cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads): unlike wall time, barely moved by
    other jobs competing for the cores."""
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


# ---------------------------------------------------------------- DeepSpeed workers

def ds_config(dp: int, checkpoint: dict | None = None) -> dict:
    cfg = {"train_batch_size": dp, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
           # buckets of 50M elements instead of 500M: the default would allocate 2 GB per rank
           "zero_optimization": {"stage": 2, "reduce_bucket_size": 50_000_000,
                                 "allgather_bucket_size": 50_000_000},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01, "torch_adam": True}},
           "steps_per_print": 10**9, "wall_clock_breakdown": False}
    if checkpoint:
        cfg["checkpoint"] = checkpoint
    return cfg


def _deepspeed():
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # a 50 s JIT build nobody uses here
    import deepspeed

    import ucp_plugin.deepspeed  # noqa: F401  (patches the engine; inactive without "universal")
    deepspeed.init_distributed(dist_backend="gloo")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


def _engine(size: str, dp: int, checkpoint: dict | None = None):
    from recipes.gpt.model import GPT, GPTConfig

    deepspeed = _deepspeed()
    torch.manual_seed(0)
    net = GPT(GPTConfig(**SIZES[size]))
    engine, _, _, _ = deepspeed.initialize(model=net, config=ds_config(dp, checkpoint),
                                           model_parameters=net.parameters())
    return engine


def _sums(engine) -> dict:
    """Weights as the model sees them, and every optimizer state summed over the ranks (float64)."""
    import torch.distributed as dist

    weights = sum(p.detach().double().sum().item() for p in engine.module.parameters())
    states = torch.zeros(2, dtype=torch.float64)
    for entry in engine.optimizer.optimizer.state.values():
        states[0] += entry["exp_avg"].double().sum()
        states[1] += entry["exp_avg_sq"].double().sum()
    dist.all_reduce(states)
    return {"weights": weights, "exp_avg": states[0].item(), "exp_avg_sq": states[1].item()}


@torch.no_grad()
def _scramble(engine) -> None:
    """Zero the weights, the fp32 master and the optimizer states, so that a load that restores
    nothing cannot pass the check that follows it (the engine is reused across loads)."""
    for p in engine.module.parameters():
        p.zero_()
    for t in engine.optimizer.single_partition_of_fp32_groups:
        t.zero_()
    for entry in engine.optimizer.optimizer.state.values():
        for v in entry.values():
            if torch.is_tensor(v) and v.dim() > 0:
                v.zero_()


def _timed(fn, barrier) -> float:
    barrier()
    start = time.perf_counter()
    fn()
    barrier()
    return time.perf_counter() - start


def save_worker(size: str, root: str, reps: int) -> dict:
    """Train one step at this DP size, then save ``reps`` times each way, alternating."""
    import torch.distributed as dist

    engine = _engine(size, int(os.environ["WORLD_SIZE"]))
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.randint(0, SIZES[size]["vocab"], (1, TOKENS + 1), generator=torch.Generator().manual_seed(rank))
    engine.backward(engine(x[:, :-1], x[:, 1:]))
    engine.step()
    params = engine._config._param_dict
    times, split = {"native": [], "universal": []}, {"native": [], "universal": []}
    for rep in range(reps):
        for side in (("native", "universal") if rep % 2 == 0 else ("universal", "native")):
            folder = os.path.join(root, side)
            if rank == 0 and os.path.exists(folder):
                shutil.rmtree(folder)
            params["checkpoint"] = {"universal": side == "universal"}

            def save():
                start = time.perf_counter()
                engine.save_checkpoint(folder, tag=TAG)
                written = time.perf_counter()
                fsync_share(folder, rank, world)
                # where a save's time goes: the call itself, then making what it left unsynced durable
                split[side].append({"save_call": written - start, "fsync": time.perf_counter() - written})
            times[side].append(_timed(save, dist.barrier))
    params["checkpoint"] = {}
    sums = _sums(engine)
    engine.destroy()
    return {"rank": rank, "times": times, "split": split, "sums": sums,
            "numel": sum(p.numel() for p in engine.module.parameters())}


class _PluginReport(logging.Handler):
    """The byte counts ``ucp_plugin.deepspeed.load`` logs after each load."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.last = None

    def emit(self, record):
        if hasattr(record, "ucp_load"):
            self.last = dict(record.ucp_load)


LOAD_SIDES = {  # side -> (folder under root, tag, ucp_plugin's "universal" key, DeepSpeed's "load_universal")
    "plugin": ("universal", TAG, True, False),
    "native": ("native", TAG, False, False),
    "ds_universal": ("native", TAG + "_universal", False, True),
}


def use_side(engine, side: str) -> tuple[str, str]:
    """Switch the engine's checkpoint settings to ``side`` (both are read at each load_checkpoint call)."""
    folder, tag, universal, ds_universal = LOAD_SIDES[side]
    engine._config._param_dict["checkpoint"] = {"universal": universal}
    engine._config.load_universal_checkpoint = ds_universal
    return folder, tag


def load_once(engine, root: str, side: str) -> dict:
    folder, tag = use_side(engine, side)
    report = _PluginReport()
    logger = logging.getLogger("ucp_plugin.deepspeed.load")
    logger.addHandler(report)
    logger.setLevel(logging.INFO)
    try:
        _scramble(engine)
        row = measured_load(root, side, lambda: engine.load_checkpoint(os.path.join(root, folder), tag=tag))
    finally:
        logger.removeHandler(report)
    return {"side": side, **row, "plugin_bytes": report.last, "sums": _sums(engine)}


def measured_load(root: str, label: str, load) -> dict:
    """One load on every rank with the same rules for every side: the checkpoint's page cache
    dropped, peak RSS reset, then wall time (to the barrier), CPU time, peak RSS and bytes read."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        drop_cache(root)
    gc.collect()
    dist.barrier()
    base_rss = proc_status("VmRSS")
    reset_peak_rss()
    io, cpu = proc_io(), cpu_seconds()
    seconds = _timed(profiled(load, label), dist.barrier)
    peak, io_after, cpu = proc_status("VmHWM"), proc_io(), cpu_seconds() - cpu
    return {"seconds": seconds, "cpu_seconds": cpu, "rss_before": base_rss, "peak_rss": peak,
            "rchar": io_after["rchar"] - io["rchar"], "read_bytes": io_after["read_bytes"] - io["read_bytes"]}


def load_worker(size: str, root: str, sides: list[str], reps: int) -> list[dict]:
    """``reps`` loads of each side into one engine, alternating which side goes first. One untimed
    load first, so that every timed load finds the optimizer states already allocated (as the
    second and later loads of a side would anyway), whichever side runs first."""
    engine = _engine(size, int(os.environ["WORLD_SIZE"]))
    load_once(engine, root, sides[0])
    out = [load_once(engine, root, side) for rep in range(reps)
           for side in (sides if rep % 2 == 0 else sides[::-1])]
    engine.destroy()
    return out


# ---------------------------------------------------------------- driver

class LoadAverage:
    """Samples the 1-minute load average every few seconds while a phase runs."""

    def __init__(self, every: float = 5.0):
        self.samples, self._stop, self.every = [], threading.Event(), every
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self):
        self.samples.append(os.getloadavg()[0])
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        return {"min": min(self.samples), "median": statistics.median(self.samples), "max": max(self.samples)}


def run_phase(results: dict, name: str, fn):
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
    with LoadAverage() as la:
        start = time.perf_counter()
        value = fn()
    results["phases"][name] = {"wall_seconds": time.perf_counter() - start, "load_average": la.summary()}
    results["phases"][name]["raw"] = value  # every rank's figures, written at once: a run cut short keeps them
    _write(results)
    return value


def _write(results: dict) -> None:
    out = results["out"]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(out + ".tmp", out)


def convert(root: str, reps: int) -> list[float]:
    """``ds_to_universal`` as DeepSpeed documents it, page cache dropped before each run."""
    src = os.path.join(root, "native", TAG)
    dst = os.path.join(root, "native", TAG + "_universal")
    times = []
    for _ in range(reps):
        shutil.rmtree(dst, ignore_errors=True)
        drop_cache(root)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", src,
                        "--output_folder", dst, "--inject_missing_state"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        drop_cache(dst)  # durable, as the saves are
        times.append(time.perf_counter() - start)
    return times


def summarise_loads(rows: list[list[dict]], saved: dict) -> dict:
    """Per side: median seconds, worst-rank peak RSS, bytes; and whether every load restored the save."""
    by_side: dict[str, list] = {}
    for rep_rank in zip(*rows):  # rows[rank][i] -> the i-th load seen by every rank
        side = rep_rank[0]["side"]
        by_side.setdefault(side, []).append(rep_rank)
    out = {}
    for side, loads in by_side.items():
        kept = [r["plugin_bytes"]["requested"] for r in loads[0] if r["plugin_bytes"]] if side == "plugin" else None
        out[side] = {
            "seconds": [ls[0]["seconds"] for ls in loads],
            "median_seconds": med([ls[0]["seconds"] for ls in loads]),
            "median_cpu_seconds_max_rank": med([max(r.get("cpu_seconds", float("nan")) for r in ls) for ls in loads]),
            "peak_rss_max": med([max(r["peak_rss"] for r in ls) for ls in loads]),
            "rss_before_max": med([max(r["rss_before"] for r in ls) for ls in loads]),
            # what the load itself adds: the processes keep what earlier loads left in the allocator,
            # so the absolute peak depends on which side ran before; the growth does not
            "rss_growth_max": med([max(r["peak_rss"] - r["rss_before"] for r in ls) for ls in loads]),
            "rchar_per_rank": [r["rchar"] for r in loads[-1]],
            "read_bytes_per_rank": [r["read_bytes"] for r in loads[-1]],
            "plugin_fetched_per_rank": [r["plugin_bytes"]["fetched"] for r in loads[-1]] if kept else None,
            "plugin_requested_per_rank": kept,
            "restored": all(_close(r["sums"], saved) for ls in loads for r in ls),
            "phases": _phases(loads) if kept else None,
        }
    return out


def _phases(loads: list) -> dict:
    """Per phase of the plugin's loads (``ucp_load`` report: open, plan, execute; read, verify and
    copy summed over the read pool's threads): the median over loads of the busiest rank's seconds."""
    names = sorted({k for ls in loads for r in ls for k in (r["plugin_bytes"] or {}).get("phases", {})})
    return {k: med([max(r["plugin_bytes"]["phases"].get(k, 0.0) for r in ls) for ls in loads]) for k in names}


def _close(a: dict, b: dict, rel: float = 1e-9) -> bool:
    return all(abs(a[k] - b[k]) <= rel * max(abs(b[k]), 1e-30) for k in b)


def deepspeed_part(args, results: dict) -> None:
    from ucp_plugin.testing.launcher import run_workers

    root, reps = args.root, args.reps
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    saves = run_phase(results, "save DP4", lambda: run_workers(
        4, "benchmarks.load_bench:save_worker", {"size": args.size, "root": root, "reps": reps},
        timeout=3600, env=env))
    saved = saves[0]["sums"]
    results["model_params"] = saves[0]["numel"]
    results["save"] = {side: saves[0]["times"][side] for side in ("native", "universal")}
    results["save_split"] = {side: {k: [max(r["split"][side][i][k] for r in saves) for i in range(reps)]
                                    for k in ("save_call", "fsync")} for side in ("native", "universal")}
    results["checkpoint_bytes"] = {side: _folder_bytes(os.path.join(root, side, TAG)) for side in ("native", "universal")}
    results["convert"] = run_phase(results, "ds_to_universal", lambda: convert(root, reps))
    results["loads"] = {}
    for dp, sides in ((2, ["plugin", "ds_universal"]), (3, ["plugin", "ds_universal"]), (4, ["plugin", "native"])):
        rows = run_phase(results, f"load DP{dp}", lambda: run_workers(
            dp, "benchmarks.load_bench:load_worker", {"size": args.size, "root": root, "sides": sides,
                                                      "reps": reps}, timeout=3600, env=env))
        results["loads"][f"DP{dp}"] = summarise_loads(rows, saved)


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="125m")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--root", help="scratch folder for the checkpoints (default /tmp/ucp-load-bench-SIZE)")
    ap.add_argument("--out", help="JSON output (default runs/load_bench-SIZE-TIME.json)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--parts", default="deepspeed,megatron", help="comma-separated: deepspeed, megatron")
    ap.add_argument("--report", help="print the markdown tables of an earlier run's JSON and exit")
    ap.add_argument("--phases", action="store_true",
                    help="also print where each plugin load's time went (open, plan, execute; read, verify, copy)")
    ap.add_argument("--profile", help="folder for cProfile stats of rank 0's loads (timings then not comparable)")
    ap.add_argument("--megatron-size", choices=sorted(SIZES), help="model of the megatron part (default --size)")
    args = ap.parse_args()
    if args.report:
        with open(args.report) as f:
            results = json.load(f)
        if args.phases:
            print_report(results, phases=True)
        print(markdown(results))
        return
    args.megatron_size = args.megatron_size or args.size
    parts = set(args.parts.split(","))
    if args.profile:
        os.environ["UCP_BENCH_PROFILE"] = os.path.abspath(args.profile)
    args.root = os.path.abspath(args.root or f"/tmp/ucp-load-bench-{args.size}")
    out = args.out or os.path.join("runs", f"load_bench-{args.size}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    shutil.rmtree(args.root, ignore_errors=True)
    os.makedirs(args.root)
    import deepspeed
    results = {"out": out, "size": args.size, "reps": args.reps, "command": " ".join(sys.argv), "cpus": os.cpu_count(),
               "started": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
               "deepspeed": deepspeed.__version__, "phases": {}}
    try:
        if "deepspeed" in parts:
            deepspeed_part(args, results)
            results["targets"] = targets(results)
        if "megatron" in parts:
            from benchmarks.load_bench_megatron import megatron_part
            megatron_part(args, results, run_phase)
    finally:
        if not args.keep:
            shutil.rmtree(args.root, ignore_errors=True)
    _write(results)
    print_report(results, phases=args.phases)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
