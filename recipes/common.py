"""What every recipe shares: real text with a byte-level tokenizer, loss-curve comparison, plot.

Text: the source files of Python's own standard library on this machine (``os.__file__``'s folder,
top-level ``*.py`` files in sorted order) — real, varied English-and-code text that needs no
download. Tokenizer: bytes, vocabulary 256. Batches are a pure function of (seed, step), so every
layout sees the same global batch at the same step.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass

import numpy as np

VOCAB = 256


def corpus(max_bytes: int = 4 << 20) -> np.ndarray:
    root = os.path.dirname(os.__file__)
    data = bytearray()
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            with open(os.path.join(root, name), "rb") as f:
                data += f.read()
        if len(data) >= max_bytes:
            break
    return np.frombuffer(bytes(data[:max_bytes]), dtype=np.uint8).astype(np.int64)


def global_batch(tokens: np.ndarray, step: int, batch: int, seq: int, seed: int = 1234) -> np.ndarray:
    """[batch, seq + 1] token windows for ``step`` (inputs are [:, :-1], labels [:, 1:])."""
    rng = np.random.default_rng(seed * 100_003 + step)
    starts = rng.integers(0, len(tokens) - seq - 1, size=batch)
    return np.stack([tokens[s:s + seq + 1] for s in starts])


@dataclass(frozen=True)
class Comparison:
    max_rel_diff: float
    tolerance: float
    steps: int

    @property
    def ok(self) -> bool:
        return self.max_rel_diff <= self.tolerance


def compare(resumed: list[float], reference: list[float], tolerance: float) -> Comparison:
    diffs = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(resumed, reference)]
    return Comparison(max(diffs) if diffs else float("inf"), tolerance, len(diffs))


def write_results(out_dir: str, before: list[float], resumed: list[float], reference: list[float],
                  meta: dict) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"csv": os.path.join(out_dir, "losses.csv"), "json": os.path.join(out_dir, "losses.json"),
             "png": os.path.join(out_dir, "losses.png")}
    n = len(before)
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "uninterrupted", "saved_then_resumed"])
        for i, ref in enumerate(reference):
            got = before[i] if i < n else resumed[i - n]
            w.writerow([i + 1, repr(ref), repr(got)])
    with open(paths["json"], "w") as f:
        json.dump({**meta, "before_switch": before, "resumed": resumed, "uninterrupted": reference}, f,
                  indent=1)
    plot(paths["png"], before, resumed, reference, meta)
    return paths


def plot(path: str, before, resumed, reference, meta: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(before)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(range(1, len(reference) + 1), reference, "-", color="0.6", lw=3,
            label=f"uninterrupted on {meta.get('layout_a', 'A')}")
    ax.plot(range(1, n + 1), before, "o-", ms=3, color="tab:blue", label=f"trained on {meta.get('layout_a', 'A')}")
    ax.plot(range(n + 1, n + len(resumed) + 1), resumed, "o-", ms=3, color="tab:orange",
            label=f"resumed on {meta.get('layout_b', 'B')}")
    ax.axvline(n + 0.5, color="k", ls="--", lw=1)
    ax.text(n + 0.6, ax.get_ylim()[1], " save → resume", va="top", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{meta.get('family', '')}: max relative difference after resume "
                 f"{meta.get('max_rel_diff', float('nan')):.2e}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
