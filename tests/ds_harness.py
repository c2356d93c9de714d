"""A tiny GPT-like model and a DeepSpeed training loop for multi-process tests and recipes (no pytest).

The model is built to catch incomplete checkpoints: parameter sizes are odd so ZeRO alignment padding
shows; ``wpe`` is a FROZEN parameter (``requires_grad=False``, outside every optimizer buffer); the
persistent BUFFER ``phase`` scales the positional term and advances by one per optimizer step, so a
resume that forgets buffers, frozen parameters, optimizer state or the LR scheduler changes the loss.

Batches are a pure function of (seed, global step): every layout sees the same global batch, split
over ranks and micro-batches (``ds_config`` derives micro-batch x accumulation from the DP size), so
per-step losses of different layouts agree to rounding. Optimizers: DeepSpeed config AdamW or Adam
(amsgrad) as torch's, DeepSpeed's own AdamW (FusedAdam; DeepSpeedCPUAdam under ZeRO-Offload), or a client torch AdamW / SGD with momentum (``train(client=...)``). ``train`` runs inside a worker started by
``ucp_plugin.testing.launcher.run_workers`` and returns JSON values only.
"""
from __future__ import annotations

import copy
import importlib
import logging
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

import ucp_plugin

MODEL_DEFAULTS = dict(vocab=37, seq=8, d=18, heads=3, hidden=45, layers=2, tied=False, dropout=0.0)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int, seq: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, hidden), nn.Linear(hidden, d)
        # Non-persistent: rebuilt identically by every constructor, so never checkpointed.
        self.register_buffer("mask", torch.tril(torch.ones(seq, seq, dtype=torch.bool)), persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = torch.einsum("bqhc,bkhc->bhqk", q, k) / math.sqrt(d // self.heads)
        att = att.masked_fill(~self.mask[:t, :t], float("-inf")).softmax(-1)
        h = h + self.proj(torch.einsum("bhqk,bkhc->bqhc", att, v).reshape(b, t, d))
        return h + self.out(F.gelu(self.fc(self.ln2(h))))


class TinyGPT(nn.Module):
    def __init__(self, vocab=37, seq=8, d=18, heads=3, hidden=45, layers=2, tied=False, dropout=0.0,
                 moving_buffer=True):
        super().__init__()
        self.drop = nn.Dropout(dropout)  # > 0 only where a test checks that RNG states are restored
        # False: ``phase`` stays 0, for runs resumed by stock DeepSpeed's universal loading, which
        # restores no buffer (nor frozen parameter: those resume from the same init seed)
        self.moving_buffer = moving_buffer
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Parameter(torch.randn(seq, d) * 0.5, requires_grad=False)
        self.register_buffer("phase", torch.zeros(()))
        self.blocks = nn.ModuleList(Block(d, heads, hidden, seq) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=True)
        if tied:
            self.head.weight = self.wte.weight

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.drop(self.wte(x) + self.wpe[:t] * torch.cos(self.phase * 0.7))
        for block in self.blocks:
            h = self.drop(block(h))
        logits = self.head(self.ln_f(h)).float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def tick(self) -> None:
        """Called once per optimizer step, identically on every rank."""
        if self.moving_buffer:
            self.phase += 1


def build_model(init_seed: int = 0, **overrides) -> TinyGPT:
    torch.manual_seed(init_seed)
    return TinyGPT(**{**MODEL_DEFAULTS, **overrides})


def global_batch(seed: int, step: int, size: int, seq: int = 8, vocab: int = 37):
    """The (inputs, targets) of global step ``step``: the same on every rank and layout."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    tokens = torch.randint(0, vocab, (size, seq + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def micro_batches(seed: int, step: int, size: int, rank: int, dp: int, micro: int, **model):
    x, y = global_batch(seed, step, size, model.get("seq", 8), model.get("vocab", 37))
    per_rank = size // dp
    x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
    return [(x[i:i + micro], y[i:i + micro]) for i in range(0, per_rank, micro)]


def micro_size(global_size: int, dp: int, cap: int = 4) -> int:
    per_rank = global_size // dp
    return max(m for m in range(1, min(cap, per_rank) + 1) if per_rank % m == 0)


def ds_config(stage: int, dtype: str = "fp32", dp: int = 1, *, global_batch: int = 12, lr: float = 3e-3,
              grad_accum_dtype: str | None = None, optimizer: str = "adamw", universal: bool | str = False,
              **zero) -> dict:
    """A DeepSpeed config whose global batch is fixed whatever ``dp``; ``zero`` adds zero_optimization keys;
    ``universal="async"`` saves universal checkpoints asynchronously."""
    if global_batch % dp:
        raise ValueError(f"global_batch {global_batch} must be divisible by dp {dp}")
    micro = micro_size(global_batch, dp)
    cfg = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": global_batch // (dp * micro),
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage, **zero},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": lr,
                                                      "warmup_num_steps": 4}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if optimizer == "adamw":  # torch's AdamW: no 80 s FusedAdam build on CPU
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.01, "torch_adam": True}}
    elif optimizer == "adam":  # torch.optim.Adam with amsgrad: a third state, max_exp_avg_sq
        cfg["optimizer"] = {"type": "Adam", "params": {"lr": lr, "weight_decay": 0.01, "torch_adam": True,
                                                       "adam_w_mode": False, "amsgrad": True}}
    elif optimizer == "fused":  # DeepSpeed's default: FusedAdam (int step), DeepSpeedCPUAdam under offload
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.01}}
    elif optimizer == "client":  # train(client=...) passes a torch optimizer; SGD is "untested" for ZeRO
        cfg["zero_allow_untested_optimizer"] = True
    else:
        raise ValueError(f"optimizer must be 'adamw', 'adam', 'fused' (config) or 'client' (torch optimizer), "
                         f"not {optimizer!r}")
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif dtype != "fp32":
        raise ValueError(f"dtype must be 'fp32' or 'bf16', not {dtype!r}")
    if grad_accum_dtype:
        cfg["data_types"] = {"grad_accum_dtype": grad_accum_dtype}
    if universal:
        cfg["checkpoint"] = {"universal": True, **({"async": True} if universal == "async" else {})}
    return cfg


def param_groups(model: nn.Module, split: bool):
    """One group of every parameter, or two (decay: matrices; no decay: vectors), as recipes do."""
    params = list(model.named_parameters())
    if not split:
        return [p for _, p in params]
    return [{"params": [p for _, p in params if p.ndim >= 2], "weight_decay": 0.01},
            {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0}]


def init_deepspeed():
    """Import DeepSpeed without the 50 s shared-memory op build, and join the process group."""
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    return deepspeed


CLIENTS = {"adamw": lambda groups, lr: torch.optim.AdamW(groups, lr=lr, weight_decay=0.01),
           "sgd": lambda groups, lr: torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=0.01)}


def make_engine(config: dict, net: nn.Module, split_groups: bool = False, client: str = "adamw"):
    """``deepspeed.initialize`` on ``net``; without an "optimizer" in ``config`` a torch optimizer
    ``CLIENTS[client]`` built here."""
    deepspeed = init_deepspeed()
    optimizer = None
    if "optimizer" not in config:
        optimizer = CLIENTS[client](param_groups(net, split_groups), config["scheduler"]["params"]["warmup_max_lr"])
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=optimizer, config=copy.deepcopy(config),
                                           model_parameters=param_groups(net, split_groups) if optimizer is None else None)
    return engine


def run_steps(engine, steps: int, seed: int, model: dict | None = None) -> list[float]:
    """Train ``steps`` optimizer steps from ``engine.global_steps``; return each step's global mean loss."""
    import torch.distributed as dist
    rank, dp = dist.get_rank(), dist.get_world_size()
    micro, size = engine.train_micro_batch_size_per_gpu(), engine.train_batch_size()
    losses = []
    for _ in range(steps):
        total = torch.zeros((), dtype=torch.float64)
        for x, y in micro_batches(seed, engine.global_steps, size, rank, dp, micro, **(model or {})):
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            total += loss.detach().double()
        ucp_plugin.poll()  # a step boundary: commits an asynchronous save every rank has written
        dist.all_reduce(total)
        losses.append(total.item() / (size // micro))
        engine.module.tick()
    return losses


def weights_digest(engine) -> float:
    """Sum (float64) of every parameter and persistent buffer as the model sees them: ZeRO-3
    parameters are gathered first. Equal digests of two engines mean the same weights up to rounding."""
    import deepspeed
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        total = sum(p.detach().double().sum().item() for p in params)
    return total + sum(b.double().sum().item() for _, b in engine.module.named_buffers() if b.dtype.is_floating_point)


class _LoadReports(logging.Handler):
    """Collects the byte counts ``ucp_plugin.deepspeed.load`` logs after each load."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.reports = []

    def emit(self, record):
        if hasattr(record, "ucp_load"):
            self.reports.append(dict(record.ucp_load))


def train(config: dict, steps: int = 5, seed: int = 0, init_seed: int = 0, save_dir: str | None = None,
          load_dir: str | None = None, tag: str | None = None, split_groups: bool = False,
          model: dict | None = None, imports: list[str] | None = None, load_kwargs: dict | None = None,
          save_at: int | None = None, client: str = "adamw") -> dict:
    """Worker: build, optionally load, train ``steps``, optionally save after ``save_at`` steps
    (default: at the end; 0: right after loading). ``imports`` are imported first (e.g.
    ``["ucp_plugin.deepspeed"]``); ``client`` picks the torch optimizer when the config has none."""
    for name in imports or []:
        importlib.import_module(name)
    engine = make_engine(config, build_model(init_seed, **(model or {})), split_groups, client)
    reports, logger = _LoadReports(), logging.getLogger("ucp_plugin.deepspeed.load")
    logger.addHandler(reports)
    logger.setLevel(logging.INFO)
    try:
        client_state = {}
        if load_dir:
            path, client_state = engine.load_checkpoint(load_dir, tag=tag, **(load_kwargs or {}))
            if path is None:
                raise RuntimeError(f"no checkpoint loaded from {load_dir} (tag {tag})")
        start, digest = engine.global_steps, weights_digest(engine)
        save_at = steps if save_at is None else save_at
        losses = run_steps(engine, save_at, seed, model)
        if save_dir:
            engine.save_checkpoint(save_dir, tag=tag, client_state={"harness_seed": seed, "losses": losses})
        losses += run_steps(engine, steps - save_at, seed, model)
        ucp_plugin.wait()  # the last asynchronous save is committed before the engine goes
    finally:
        logger.removeHandler(reports)
        engine.destroy()
    return {"rank": int(os.environ.get("RANK", 0)), "start_step": start, "losses": losses,
            "digest_after_load": digest, "client_state": _jsonable(client_state), "load_reports": reports.reports}


def _jsonable(client: dict) -> dict:
    return {k: v for k, v in (client or {}).items() if isinstance(v, (int, float, str, list, bool))}


def train_many(runs: list[dict]) -> list[dict]:
    """Worker: several ``train`` runs one after the other in this process (one launch, many engines).
    A run with ``"expect_error": True`` returns ``{"error": "<Type>: <message>"}`` instead of raising."""
    init_deepspeed()
    out = []
    for run in runs:
        run = dict(run)
        if not run.pop("expect_error", False):
            out.append(train(**run))
            continue
        try:
            train(**run)
            out.append({"error": None})
        except Exception as e:  # reported to the test, which checks type and message
            out.append({"error": f"{type(e).__name__}: {e}"})
    return out
