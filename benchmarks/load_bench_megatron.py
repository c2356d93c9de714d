"""The megatron-core part of ``load_bench.py``: a GPT (megatron's own ``GPTModel``, fp32, the
DistributedOptimizer with torch AdamW) trained one step at TP2·PP2 and saved twice, by ucp_plugin
and by megatron's ``dist_checkpointing`` (``fully_reshardable`` optimizer state, the only sharding
type that can change TP/PP); then loaded at TP1·DP4 by each, alternating, the page cache dropped
before each load. The same fairness rules as ``load_bench.py`` (durable saves, one engine per
process after an untimed load, state zeroed before each load and compared after it).
"""
from __future__ import annotations

import os
import shutil

import torch

from benchmarks.load_bench import _timed, fsync_share, measured_load

SIZES = {  # the same shapes as load_bench.SIZES (megatron pads the vocabulary to a multiple of 128)
    "125m": dict(hidden=768, heads=12, ffn=3072, layers=12, vocab=50257, tied=True, seq_length=32),
    "350m": dict(hidden=1024, heads=16, ffn=4096, layers=24, vocab=50257, tied=True, seq_length=32),
    "40m": dict(hidden=512, heads=8, ffn=2048, layers=8, vocab=32000, tied=True, seq_length=32),
    "smoke": dict(hidden=64, heads=4, ffn=256, layers=4, vocab=1000, tied=True, seq_length=32),
}
SAVE_LAYOUT, LOAD_LAYOUT = dict(tp=2, pp=2, dp=1), dict(tp=1, pp=1, dp=4)
SETTINGS = dict(steps=1, global_batch=4, micro_batch=1)
SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}
TAG = "bench"


def _run(size: str, layout: dict, reference_init: bool):
    from ucp_plugin.testing.harness import TrainSettings, init_process, setup
    from ucp_plugin.megatron.layout import MegatronLayout
    from ucp_plugin.models import ModelConfig

    init_process()
    return setup("gpt", ModelConfig(**SIZES[size]), MegatronLayout(**layout), TrainSettings(**SETTINGS),
                 reference_init=reference_init)


def _mcore_state(run, loading: bool) -> dict:
    from ucp_plugin.megatron.model_view import unwrap

    model = unwrap(run.model).sharded_state_dict()
    return {"model": model,
            "optimizer": run.optimizer.sharded_state_dict(model, is_loading=loading, metadata=SHARDING)}


def mcore_save(run, folder: str) -> None:
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(_mcore_state(run, False), folder)


def mcore_load(run, folder: str) -> None:
    """As Megatron-LM's ``load_checkpoint`` does for a torch_dist checkpoint."""
    from megatron.core import dist_checkpointing

    from ucp_plugin.megatron.model_view import unwrap
    from ucp_plugin.megatron.distopt_fixes import ensure_optimizer_state

    ensure_optimizer_state(run.optimizer)
    loaded = dist_checkpointing.load(_mcore_state(run, True), folder)
    unwrap(run.model).load_state_dict(loaded["model"])
    run.optimizer.load_state_dict(loaded["optimizer"])


def ucp_save(run, folder: str) -> None:
    from ucp_plugin.megatron.checkpoint import save_universal

    save_universal(run.model, run.optimizer, folder, TAG, 1, family="gpt", config=run.cfg)


_TENSOR_BYTES: list[int] = []  # per plugin load on this rank: tensor bytes its Checkpoint read


def ucp_load(run, folder: str) -> None:
    """The plugin's load; records the tensor bytes it read (``Checkpoint.bytes_read``: the plugin
    reads through mmap, which the kernel's ``rchar`` does not count)."""
    from ucp_plugin.megatron.checkpoint import load_universal
    from ucp_plugin.storage import Checkpoint

    real, opened = Checkpoint.open, []
    Checkpoint.open = staticmethod(lambda path, verify=True: opened.append(real(path, verify)) or opened[-1])
    try:
        load_universal(run.model, run.optimizer, folder, TAG, family="gpt", config=run.cfg)
    finally:
        Checkpoint.open = staticmethod(real)
    _TENSOR_BYTES.append(sum(ck.bytes_read for ck in opened))


SIDES = {"plugin": ("ucp", ucp_save, ucp_load), "megatron": ("mcore", mcore_save, mcore_load)}


def save_worker(size: str, root: str, reps: int) -> dict:
    import torch.distributed as dist

    from ucp_plugin.testing.harness import token_batches, train_step

    run = _run(size, SAVE_LAYOUT, reference_init=True)
    train_step(run, token_batches(run.cfg, run.settings)[0])
    rank, world = dist.get_rank(), dist.get_world_size()
    times = {side: [] for side in SIDES}
    for rep in range(reps):
        for side in (list(SIDES) if rep % 2 == 0 else list(SIDES)[::-1]):
            name, save, _ = SIDES[side]
            folder = os.path.join(root, name)
            if rank == 0:
                shutil.rmtree(folder, ignore_errors=True)
                os.makedirs(folder)
            dist.barrier()

            def durable_save():
                save(run, folder)
                fsync_share(folder, rank, world)
            times[side].append(_timed(durable_save, dist.barrier))
    return {"rank": rank, "times": times}


def _inner_states(run):
    from ucp_plugin.megatron.distopt_fixes import inner_optimizers

    for opt in inner_optimizers(run.optimizer):
        for entry in opt.optimizer.state.values():
            yield entry


@torch.no_grad()
def _scramble(run) -> None:
    for p in run.model.parameters():
        p.zero_()
    for entry in _inner_states(run):
        for v in entry.values():
            if torch.is_tensor(v) and v.dim() > 0:
                v.zero_()


def _sums(run) -> dict:
    """At TP1·DP4 every rank holds the whole model; the optimizer states are summed over the ranks."""
    import torch.distributed as dist

    weights = sum(p.detach().double().sum().item() for p in run.model.parameters())
    states = torch.zeros(2, dtype=torch.float64)
    for entry in _inner_states(run):
        states[0] += entry["exp_avg"].double().sum()
        states[1] += entry["exp_avg_sq"].double().sum()
    dist.all_reduce(states)
    return {"weights": weights, "exp_avg": states[0].item(), "exp_avg_sq": states[1].item()}


def load_once(run, root: str, side: str) -> dict:
    name, _, load = SIDES[side]
    _scramble(run)
    row = measured_load(root, "megatron-" + side, lambda: load(run, os.path.join(root, name)))
    read = {"tensor_bytes_read": _TENSOR_BYTES[-1]} if side == "plugin" else {}
    return {"side": side, **row, **read, "sums": _sums(run)}


def load_worker(size: str, root: str, reps: int) -> list[dict]:
    run = _run(size, LOAD_LAYOUT, reference_init=False)
    sides = list(SIDES)
    load_once(run, root, sides[0])  # untimed: allocates the optimizer states
    return [load_once(run, root, side) for rep in range(reps) for side in (sides if rep % 2 == 0 else sides[::-1])]


def megatron_part(args, results: dict, run_phase) -> None:
    from ucp_plugin.testing.launcher import run_workers

    root = os.path.join(args.root, "megatron")
    os.makedirs(root, exist_ok=True)
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    kwargs = {"size": args.megatron_size, "root": root, "reps": args.reps}
    saves = run_phase(results, "megatron save TP2·PP2", lambda: run_workers(
        4, "benchmarks.load_bench_megatron:save_worker", kwargs, timeout=3600, env=env))
    rows = run_phase(results, "megatron load TP1·DP4", lambda: run_workers(
        4, "benchmarks.load_bench_megatron:load_worker", kwargs, timeout=3600, env=env))
    loads: dict[str, list] = {}
    for per_rank in zip(*rows):
        loads.setdefault(per_rank[0]["side"], []).append(per_rank)
    reference = loads["megatron"][0][0]["sums"]
    results["megatron"] = {
        "size": args.megatron_size, "save": saves[0]["times"],
        "loads": {side: {"seconds": [ls[0]["seconds"] for ls in ld],
                         "cpu_seconds_max_rank": [max(r["cpu_seconds"] for r in ls) for ls in ld],
                         "peak_rss_max": sorted(max(r["peak_rss"] for r in ls) for ls in ld)[len(ld) // 2],
                         "rss_before_max": max(r["rss_before"] for ls in ld for r in ls),
                         "rchar_per_rank": [r["rchar"] for r in ld[-1]],
                         "tensor_bytes_read_per_rank": [r.get("tensor_bytes_read") for r in ld[-1]],
                         "same_state_as_megatron": all(_close(r["sums"], reference) for ls in ld for r in ls),
                         "sums": ld[-1][0]["sums"]}
                  for side, ld in loads.items()},
        "checkpoint_bytes": {side: _folder_bytes(os.path.join(root, SIDES[side][0])) for side in SIDES},
    }


def _close(a: dict, b: dict, rel: float = 1e-9) -> bool:
    return all(abs(a[k] - b[k]) <= rel * max(abs(b[k]), 1e-30) for k in b) and b["exp_avg_sq"] != 0


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)
