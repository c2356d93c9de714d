"""Read amplification and throughput of resharding reads (no framework, one process).

Writes a synthetic transformer-shaped checkpoint as layout A (every rank's shard written in turn,
as the ranks would), then reads every fragment of layout B and prints, per target layout: bytes the
target ranks need, bytes actually read from disk, the ratio, and read throughput, with chunk
verification (whole chunks are fetched) and without (exactly the needed elements are fetched).

    python benchmarks/reshard_io.py --hidden 512 --layers 4
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import numpy as np
import torch

from ucp_plugin.language import Fused, Partitioned, Replicated
from ucp_plugin.plan import local_numel, region_for
from ucp_plugin.storage import Checkpoint, ShardWriter, commit, prepare_staging
from ucp_plugin.format import Atom, Layout, Manifest, Writer

STATES = ("fp32", "exp_avg", "exp_avg_sq")


def params(hidden: int, layers: int):
    out = [("embedding.word_embeddings.weight", (8 * hidden, hidden), Partitioned(0))]
    for i in range(layers):
        p = f"decoder.layers.{i}."
        out += [(p + "self_attention.linear_qkv.weight", (3 * hidden, hidden), Partitioned(0, groups=8)),
                (p + "self_attention.linear_proj.weight", (hidden, hidden), Partitioned(1)),
                (p + "mlp.linear_fc1.weight", (8 * hidden, hidden), Fused(0, (4 * hidden, 4 * hidden))),
                (p + "mlp.linear_fc2.weight", (hidden, 4 * hidden), Partitioned(1)),
                (p + "input_layernorm.weight", (hidden,), Replicated())]
    return out


def ranges(n: int, dp: int):
    b = np.linspace(0, n, dp + 1).astype(int)
    return list(zip(b[:-1].tolist(), b[1:].tolist()))


def write(root: str, model, tp: int, dp: int) -> float:
    t0 = time.perf_counter()
    staging = prepare_staging(root, ".staging")
    for t in range(tp):
        for d in range(dp):
            w = ShardWriter(staging, t * dp + d)
            for name, shape, split in model:
                w.add_atom(Atom(name, "param", shape, split.to_json(), {s: "float32" for s in STATES}, {}))
                if isinstance(split, Replicated) and t:
                    continue
                region = region_for(split, shape, t, tp)
                a, b = ranges(local_numel(region, shape), dp)[d]
                for s in STATES:
                    w.add(name, s, torch.randn(b - a), region, a)
            w.finish()
    header = Manifest(Writer("bench", "1", "0"), Layout(tp=tp, dp=dp), ())
    commit(root, staging, "ck", tp * dp, header)
    return time.perf_counter() - t0


def read_all(path: str, model, tp: int, dp: int, verify: bool) -> tuple[int, int, float]:
    needed = read = 0
    t0 = time.perf_counter()
    for t in range(tp):
        for d in range(dp):
            ck = Checkpoint.open(path, verify)
            for name, shape, split in model:
                region = region_for(split, shape, t, tp)
                a, b = ranges(local_numel(region, shape), dp)[d]
                for s in STATES:
                    ck.read_fragment(name, s, region, a, b)
                    needed += (b - a) * 4
            read += ck.bytes_read
    return needed, read, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    model = params(args.hidden, args.layers)
    numel = sum(int(np.prod(s)) for _, s, _ in model)
    root = tempfile.mkdtemp()
    try:
        secs = write(root, model, 2, 4)
        print(f"model: {numel / 1e6:.1f}M params x {len(STATES)} fp32 states = "
              f"{numel * 12 / 2**20:.0f} MiB; wrote TP2·DP4 in {secs:.2f}s")
        for tp, dp in [(2, 4), (2, 3), (1, 4), (4, 2), (4, 3), (1, 1)]:
            for verify in (True, False):
                needed, got, secs = read_all(f"{root}/ck", model, tp, dp, verify)
                print(f"  read as TP{tp}·DP{dp} ({'verified' if verify else 'verify=False'}): needed "
                      f"{needed / 2**20:7.1f} MiB, read {got / 2**20:7.1f} MiB (x{got / needed:.3f}), "
                      f"{needed / 2**20 / secs:7.1f} MiB/s")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
