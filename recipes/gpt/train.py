"""GPT with DeepSpeed ZeRO on real text: the worker each rank runs (via ``ucp_plugin.testing.launcher``).

The only change a DeepSpeed user makes for universal checkpoints is in ``ds_config``:
``"checkpoint": {"universal": True}`` plus ``import ucp_plugin.deepspeed``; ``save_checkpoint`` and
``load_checkpoint`` are DeepSpeed's own calls.
"""
from __future__ import annotations

import importlib
import json
import sys
from dataclasses import dataclass

import torch

from recipes.common import corpus, global_batch
from recipes.gpt.model import GPT, GPTConfig

GLOBAL_BATCH = 16


@dataclass(frozen=True)
class DSLayout:
    dp: int
    zero: int
    dtype: str = "fp32"

    @staticmethod
    def parse(text: str) -> "DSLayout":
        """'zero2-dp4' or 'zero3-dp2-bf16'."""
        parts = dict(zero=None, dp=None, dtype="fp32")
        for token in text.lower().split("-"):
            if token.startswith("zero"):
                parts["zero"] = int(token[4:])
            elif token.startswith("dp"):
                parts["dp"] = int(token[2:])
            elif token in ("fp32", "bf16"):
                parts["dtype"] = token
            else:
                raise ValueError(f"layout {text!r}: unknown part {token!r}; use e.g. 'zero2-dp4' or 'zero3-dp2-bf16'")
        if parts["zero"] is None or parts["dp"] is None:
            raise ValueError(f"layout {text!r} needs a ZeRO stage and a DP size, e.g. 'zero2-dp4'")
        return DSLayout(parts["dp"], parts["zero"], parts["dtype"])

    def describe(self) -> str:
        return f"ZeRO-{self.zero} DP{self.dp} {self.dtype}"


def ds_config(layout: DSLayout) -> dict:
    cfg = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // layout.dp,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1, "torch_adam": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-3,
                                                      "warmup_num_steps": 10}},
        "zero_optimization": {"stage": layout.zero},
        "checkpoint": {"universal": True},
        "steps_per_print": 10**9,
    }
    if layout.dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def _deepspeed():
    # skip DeepSpeed's shared-memory op build (~50 s on a fresh machine; CPU runs use gloo)
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    import deepspeed
    import ucp_plugin.deepspeed  # noqa: F401  (enables "checkpoint": {"universal": true})
    deepspeed.init_distributed(dist_backend="gloo")
    return deepspeed


def train(layout: str, steps: int, model: dict, save_dir: str | None = None, load_dir: str | None = None,
          progress: str | None = None, seed: int = 1234) -> dict:
    import torch.distributed as dist

    deepspeed = _deepspeed()
    lay = DSLayout.parse(layout)
    config = GPTConfig(**model)
    torch.manual_seed(seed)
    net = GPT(config)
    engine, *_ = deepspeed.initialize(model=net, config=ds_config(lay), model_parameters=net.parameters())
    step = 0
    if load_dir:
        _, client = engine.load_checkpoint(load_dir)
        step = client["data_step"]
    tokens, rank, per_rank = corpus(), dist.get_rank(), GLOBAL_BATCH // lay.dp
    losses = []
    for _ in range(steps):
        batch = torch.from_numpy(global_batch(tokens, step, GLOBAL_BATCH, config.seq, seed))
        mine = batch[rank * per_rank:(rank + 1) * per_rank]
        loss = engine(mine[:, :-1], mine[:, 1:])
        engine.backward(loss)
        engine.step()
        engine.module.tokens_seen += GLOBAL_BATCH * config.seq
        total = loss.detach().double()
        dist.all_reduce(total)
        losses.append(total.item() / lay.dp)
        step += 1
        if progress and rank == 0:
            with open(progress, "a") as f:
                f.write(json.dumps({"step": step, "loss": losses[-1]}) + "\n")
    if save_dir:
        engine.save_checkpoint(save_dir, tag=f"global_step{step}", client_state={"data_step": step})
    engine.destroy()
    return {"losses": losses, "tokens_seen": int(engine.module.tokens_seen)}
