"""Scale simulation of universal-checkpoint metadata: no process group, no tensors, real code.

Synthetic saves of a LLaMA-70B-shaped model (80 layers, hidden 8192, GQA 64/8, FFN 28672, vocab
128256) at TP8·PP8·DP{1,8,64} (64, 512, 4,096 ranks) and a Mixtral-8x22B-shaped one at
EP8·TP4·PP4·DP32 (512 ranks), megatron-core's distributed optimizer (fp32 master + exp_avg +
exp_avg_sq, each (TP, PP) rank's local parameters flattened and cut into DP equal shards, experts
over the expert-data-parallel group). Every rank's shard index is built with the real metadata
classes (``format.ShardIndex``, ``Atom``, ``Piece``, splits and regions from the real model specs)
and written to disk; rank 0's commit is the real ``storage.commit``. Loads at other layouts describe
what each rank of the target needs as the megatron adapter does and plan them with the real
``Checkpoint.open`` / ``Checkpoint.plan`` on the committed folder, for a sample of ranks. The loader
(``--loader``): ``dp-shards`` (the adapter's: the fp32 master and optimizer states of the rank's own
distributed-optimizer range; megatron's DP all-gather then assembles the model parameters) or
``whole-weights`` (the adapter before: every local fp32 weight whole on every DP rank, the optimizer
states of its range), kept for comparison.

Per loading rank (median and worst of the sample): metadata bytes read (top manifest + shard
indexes read + the tensor headers and 32-byte chunk digests the plan's execution will read), files
opened (tensor files the plan touches) against files holding bytes it keeps, planning time and peak
Python memory (tracemalloc, a second run), bytes read vs kept (verified: whole chunks). Rank 0's
commit: time (one run) and peak memory (tracemalloc, a second run on a copy).

    python benchmarks/scale_sim.py --out benchmarks/scale_sim.json [--sample 8] [--quick]
                                   [--loader dp-shards|whole-weights]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ucp_plugin.format import INDEX, Atom, FileEntry, Layout, Piece, ShardIndex  # noqa: E402
from ucp_plugin.language import Replicated  # noqa: E402
from ucp_plugin.models import llama, mixtral  # noqa: E402
from ucp_plugin.models.config import ModelConfig  # noqa: E402
from ucp_plugin.plan import local_numel, region_for  # noqa: E402
from ucp_plugin.plan.reads import ReadItem  # noqa: E402
from ucp_plugin.session import SaveHeader  # noqa: E402
from ucp_plugin.storage import Checkpoint, commit, prepare_staging  # noqa: E402
from ucp_plugin.storage.writer import chunk_size  # noqa: E402

STATES = ("fp32", "exp_avg", "exp_avg_sq")
LOADERS = ("dp-shards", "whole-weights")
F32 = 4
MODELS = {
    "llama-70b": (llama, ModelConfig(hidden=8192, heads=64, query_groups=8, ffn=28672, layers=80, vocab=128256)),
    "mixtral-8x22b": (mixtral, ModelConfig(hidden=6144, heads=48, query_groups=8, ffn=16384, layers=56,
                                           vocab=32768, experts=8)),
}


def model_params(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...], int | None, int | None]]:
    """(global name, shape, layer or None, expert or None), in megatron-core's module order."""
    h, g, hd = cfg.hidden, cfg.groups, cfg.hidden // cfg.heads
    out = [("embedding.word_embeddings.weight", (cfg.vocab, h), None, None)]
    for i in range(cfg.layers):
        p = f"decoder.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,), i, None),
                (p + "self_attention.linear_qkv.weight", ((cfg.heads + 2 * g) * hd, h), i, None),
                (p + "self_attention.linear_proj.weight", (h, h), i, None),
                (p + "pre_mlp_layernorm.weight", (h,), i, None)]
        if cfg.experts:
            out.append((p + "mlp.router.weight", (cfg.experts, h), i, None))
            for e in range(cfg.experts):
                q = f"{p}mlp.experts.local_experts.{e}."
                out += [(q + "linear_fc1.weight", (2 * cfg.expert_ffn, h), i, e),
                        (q + "linear_fc2.weight", (h, cfg.expert_ffn), i, e)]
        else:
            out += [(p + "mlp.linear_fc1.weight", (2 * cfg.ffn, h), i, None),
                    (p + "mlp.linear_fc2.weight", (h, cfg.ffn), i, None)]
    return out + [("decoder.final_layernorm.weight", (h,), None, None),
                  ("output_layer.weight", (cfg.vocab, h), None, None)]


class Job:
    """One layout of one model: which parameters and which part of each a rank holds."""

    def __init__(self, model: str, tp: int, pp: int, dp: int, ep: int = 1):
        module, self.cfg = MODELS[model]
        self.spec = module.spec(self.cfg)
        self.params = model_params(self.cfg)
        self.spec.check_names([n for n, *_ in self.params])
        self.tp, self.pp, self.dp, self.ep = tp, pp, dp, ep
        self.layout = Layout(tp=tp, pp=pp, dp=dp, ep=ep, zero_stage=1)
        self.splits = {n: self.spec.split_for(n) for n, *_ in self.params}
        self._groups: dict = {}

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(tp rank, dp rank, pp rank): megatron's order, TP fastest, then DP, then PP."""
        return rank % self.tp, (rank // self.tp) % self.dp, rank // (self.tp * self.dp)

    def local(self, t: int, d: int, p: int, expert: bool) -> list[tuple[str, tuple, object, int, int]]:
        """(name, shape, region, local numel, real numel) of the dense or expert parameters held."""
        per = self.cfg.layers // self.pp
        lo, hi = p * per, (p + 1) * per
        ep_rank, per_ep = d % self.ep, max(1, self.cfg.experts // self.ep)
        out = []
        for name, shape, layer, e in self.params:
            if (e is not None) != expert:
                continue
            if layer is None:
                if (name.startswith("embedding") and p != 0) or (not name.startswith("embedding") and p != self.pp - 1):
                    continue
            elif not lo <= layer < hi:
                continue
            if e is not None and not ep_rank * per_ep <= e < (ep_rank + 1) * per_ep:
                continue
            region = region_for(self.splits[name], shape, t, self.tp)
            n = local_numel(region, shape)
            out.append((name, shape, region, n, n - region.pad * math.prod(shape[1:])))
        return out

    def shards(self, t: int, d: int, p: int) -> list[tuple[tuple, int, int]]:
        """The distributed optimizer's ranges: (entry, start, stop) of local elements this rank owns."""
        out = []
        for expert in (False, True):
            key = (t, p, d % self.ep if expert else 0, expert)
            if key not in self._groups:
                self._groups[key] = self.local(t, d, p, expert)
            entries = self._groups[key]
            group = self.dp // self.ep if expert else self.dp
            rank_in = d // self.ep if expert else d
            total = sum(n for *_, n, _ in entries)
            size = -(-total // group) if total else 0
            a, b, off = rank_in * size, (rank_in + 1) * size, 0
            for entry in entries:
                n = entry[3]
                lo, hi = max(a, off), min(b, off + n)
                if lo < hi:
                    out.append((entry, lo - off, hi - off))
                off += n
        return out


def shard_index(job: Job, rank: int) -> tuple[ShardIndex, int, int]:
    """What ``ShardWriter.finish`` records for ``rank`` (pieces, digests positions, file sizes),
    with the data's size and its chunk-digest bytes."""
    t, d, p = job.coords(rank)
    atoms, pieces, data, digest_at = {}, [], 0, 0
    for (name, shape, region, n, real), lo, hi in job.shards(t, d, p):
        split = job.splits[name]
        if isinstance(split, Replicated) and t != 0:
            continue  # TP rank 0 writes a replicated parameter
        hi = min(hi, real)  # vocabulary padding rows go to a padding atom, left out here
        if hi <= lo:
            continue
        atoms[name] = Atom(name, "param", shape, split.to_json(), {s: "float32" for s in STATES}, {"step": 1000})
        chunk = chunk_size(hi - lo)
        for s in STATES:
            pieces.append((name, Piece(s, f"shards/rank-{rank:05d}.safetensors", f"{name}/{s}/0", region, lo, hi,
                                       0, chunk, (), digest_at)))
            digest_at += -(-(hi - lo) // chunk)
            data += (hi - lo) * F32
    files = (FileEntry(f"shards/rank-{rank:05d}.safetensors", data + 32 * digest_at, "0" * 64),
             FileEntry(f"state/rank-{rank:05d}.json", 2048, "0" * 64))
    return ShardIndex(rank, tuple(atoms.values()), tuple(pieces), files), data, 32 * digest_at


def save(job: Job, root: str) -> dict:
    staging = prepare_staging(root, ".staging")
    data = digests = index_bytes = 0
    for rank in range(job.world):
        index, n, dg = shard_index(job, rank)
        text = index.to_json()
        with open(os.path.join(staging, INDEX.format(rank=rank)), "w") as f:
            f.write(text)
        data, digests, index_bytes = data + n, digests + dg, index_bytes + len(text)
    copy = staging + "-copy"
    shutil.copytree(staging, copy)
    header = SaveHeader("megatron.core", "1", "megatron-core", "sim", job.layout, family=job.spec.family).manifest()
    t0 = time.perf_counter()
    commit(root, staging, "ck", job.world, header, update_latest=False)
    seconds = time.perf_counter() - t0
    tracemalloc.start()
    commit(root, copy, "ck-traced", job.world, header, update_latest=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    shutil.rmtree(os.path.join(root, "ck-traced"))
    top = os.path.getsize(os.path.join(root, "ck", "ucp.json"))
    return {"ranks": job.world, "data_bytes": data, "top_manifest_bytes": top, "index_bytes": index_bytes,
            "digest_bytes": digests, "metadata_bytes": top + index_bytes + digests,
            "commit_s": seconds, "commit_peak_mb": peak / 2**20}


def items(job: Job, rank: int, loader: str) -> list[ReadItem]:
    """What megatron's loader asks for on ``rank``: the master and optimizer states of its
    distributed-optimizer range (``whole-weights``: every local fp32 weight whole instead)."""
    t, d, p = job.coords(rank)
    shard_states = STATES if loader == "dp-shards" else STATES[1:]
    out = [ReadItem(name, s, region, lo, hi) for (name, _, region, n, _), lo, hi in job.shards(t, d, p)
           for s in shard_states]
    if loader == "whole-weights":
        out += [ReadItem(name, "fp32", region, 0, n)
                for expert in (False, True) for name, _, region, n, _ in job.local(t, d, p, expert)]
    return out


def load_rank(folder: str, job: Job, rank: int, loader: str) -> dict:
    wanted = items(job, rank, loader)
    ck = Checkpoint.open(folder)
    t0 = time.perf_counter()
    plans = [ck.plan(i) for i in wanted]
    seconds = time.perf_counter() - t0
    tracemalloc.start()
    again = Checkpoint.open(folder)
    [again.plan(i) for i in wanted]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    fetches = [f for plan in plans for fs in plan.replicas for f in fs]
    files = {f.piece.file for f in fetches}
    keeping = {f.piece.file for f in fetches if sum(c.total for c in f.copies) > 0}
    digests = sum(32 * -(-(f.hi - f.lo) // f.piece.chunk_elems) for f in fetches)
    pieces_per_file = {}
    for f in fetches:
        pieces_per_file.setdefault(f.piece.file, set()).add(f.piece.key)
    headers = sum(120 * (len(k) + 1) for k in pieces_per_file.values())  # ~120 header bytes per tensor
    return {"rank": rank, "plan_s": seconds, "plan_peak_mb": peak / 2**20, "files_opened": len(files),
            "files_keeping": len(keeping), "metadata_bytes": ck.metadata_bytes + digests + headers,
            "metadata_index_bytes": ck.metadata_bytes,
            "bytes_read": sum(f.elements for f in fetches) * F32,
            "bytes_kept": sum(c.total for f in fetches for c in f.copies) * F32}


def sample(world: int, n: int) -> list[int]:
    return sorted({round(i * (world - 1) / max(n - 1, 1)) for i in range(n)})


def summary(rows: list[dict], key: str) -> dict:
    values = [r[key] for r in rows]
    return {"median": statistics.median(values), "worst": max(values)}


def run_case(model: str, src: tuple, targets: dict, n_sample: int, work: str, loader: str) -> dict:
    job = Job(model, *src)
    root = tempfile.mkdtemp(dir=work)
    saved = save(job, root)
    loads = {}
    for name, dst in targets.items():
        target = Job(model, *dst)
        rows = [load_rank(os.path.join(root, "ck"), target, r, loader) for r in sample(target.world, n_sample)]
        loads[name] = {"layout": target.layout.describe(), "ranks": target.world, "sample": len(rows),
                       **{k: summary(rows, k) for k in rows[0] if k != "rank"},
                       "metadata_share": summary([{"x": r["metadata_bytes"] / saved["metadata_bytes"]} for r in rows], "x"),
                       "files_equal_keeping": all(r["files_opened"] == r["files_keeping"] for r in rows)}
    shutil.rmtree(root)
    return {"model": model, "saved": job.layout.describe(), **saved, "loads": loads}


def cases(quick: bool) -> list:
    out = []
    for dp in ((1, 8) if quick else (1, 8, 64)):
        out.append(("llama-70b", (8, 8, dp), {"TP4·PP8": (4, 8, 2 * dp), "TP8·PP4": (8, 4, 2 * dp),
                                                 "DP only": (8, 8, 2 if dp == 1 else dp * 3 // 2)}))
    out.append(("mixtral-8x22b", (4, 4, 32, 8), {"TP2·PP4": (2, 4, 64, 8), "TP4·PP2": (4, 2, 64, 8),
                                                 "DP only": (4, 4, 48, 8)}))
    return out


def table(results: list[dict]) -> str:
    mb = 2**20
    lines = ["| saved | ranks | data | metadata total (top / indexes / digests) | commit s | commit MB | "
             "load at | metadata read per rank, median / worst | share of total, worst | files opened = "
             "files kept, median / worst | planning s, median / worst | planning MB, worst | read ÷ kept, worst |",
             "|" + "---|" * 13]
    for r in results:
        for name, l in r["loads"].items():
            lines.append(
                f"| {r['model']} {r['saved'].split(' ')[0]} | {r['ranks']} | {r['data_bytes'] / 2**40:.2f} TiB | "
                f"{r['metadata_bytes'] / mb:.1f} MB ({r['top_manifest_bytes'] / mb:.2f} / {r['index_bytes'] / mb:.1f} / "
                f"{r['digest_bytes'] / mb:.1f}) | {r['commit_s']:.2f} | {r['commit_peak_mb']:.0f} | "
                f"{l['layout'].split(' ')[0]} | {l['metadata_bytes']['median'] / mb:.2f} / {l['metadata_bytes']['worst'] / mb:.2f} MB | "
                f"{100 * l['metadata_share']['worst']:.2f}% | "
                f"{'yes' if l['files_equal_keeping'] else 'NO'}, {l['files_opened']['median']:.0f} / {l['files_opened']['worst']} | "
                f"{l['plan_s']['median']:.2f} / {l['plan_s']['worst']:.2f} | {l['plan_peak_mb']['worst']:.0f} | "
                f"{l['bytes_read']['worst'] / max(l['bytes_kept']['worst'], 1):.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/scale_sim.json")
    ap.add_argument("--sample", type=int, default=8, help="loading ranks planned per case")
    ap.add_argument("--quick", action="store_true", help="64 and 512 ranks only")
    ap.add_argument("--loader", choices=LOADERS, default=LOADERS[0],
                    help="what a loading rank reads (see the module docstring)")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="ucp-scale-")
    try:
        results = []
        for model, src, targets in cases(args.quick):
            results.append(run_case(model, src, targets, args.sample, work, args.loader))
            print(f"done {model} {results[-1]['saved']} ({results[-1]['ranks']} ranks)", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machine = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    with open(args.out, "w") as f:
        json.dump({"machine": machine, "argv": sys.argv, "loader": args.loader, "results": results}, f, indent=1)
    print(table(results))


if __name__ == "__main__":
    main()
