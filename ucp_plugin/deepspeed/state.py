"""Training state besides the tensors: engine counters, LR scheduler, optimizer hyperparameters and
loss scaler (one copy, ``state/common``), and each rank's RNG (``state/rank-N``).

Everything here is numbers, strings, tuples, dicts and tensors (``format.treecodec``), never pickle.
Optimizer hyperparameters (lr, betas, weight decay, ...) are saved per param group because the LR a
resumed step uses is whatever the last scheduler step left in ``param_groups``; restoring only the
scheduler's counter would run the first resumed step at the initial LR.
"""
from __future__ import annotations

import logging
import random

import numpy as np
import torch

from ..errors import StateMismatchError

log = logging.getLogger(__name__)
_SCALER_TYPES = (int, float, bool, str, type(None))


def _scaler_state(opt) -> dict | None:
    scaler = getattr(opt, "loss_scaler", None)
    if scaler is None:
        return None
    fields = {k: v for k, v in vars(scaler).items() if isinstance(v, _SCALER_TYPES)}
    return {"class": type(scaler).__name__, "fields": fields}


def optimizer_state(engine, base) -> dict:
    opt = engine.optimizer
    wrapper = {k: getattr(opt, k) for k in ("dynamic_loss_scale", "overflow", "clip_grad")
               if isinstance(getattr(opt, k, None), _SCALER_TYPES) and hasattr(opt, k)}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
    return {"class": type(base).__name__, "param_groups": groups, "wrapper": wrapper,
            "loss_scaler": _scaler_state(opt)}


def check_optimizer(base, state: dict, where: str) -> None:
    """Refuse optimizer states saved by another optimizer class (an SGD momentum buffer is no Adam
    state). Native DeepSpeed checkpoints do not record the class."""
    saved = (state.get("optimizer") or {}).get("class")
    if saved is not None and saved != type(base).__name__:
        raise StateMismatchError(f"{where}: optimizer states were saved by {saved}, the engine's optimizer is "
                                 f"{type(base).__name__}; use the same optimizer, or pass "
                                 "load_optimizer_states=False to start its states afresh")


def common_state(engine, base, client_state: dict, meta: dict) -> dict:
    sched = engine.lr_scheduler
    return {"engine": {"global_steps": engine.global_steps, "global_samples": engine.global_samples,
                       "skipped_steps": engine.skipped_steps},
            "lr_scheduler": sched.state_dict() if sched is not None else None,
            "optimizer": optimizer_state(engine, base),
            "client_state": dict(client_state),
            "source": meta}


def restore_optimizer(engine, base, saved: dict, where: str) -> None:
    groups = saved.get("param_groups") or []
    if len(groups) != len(base.param_groups):
        raise StateMismatchError(f"{where}: the checkpoint's optimizer has {len(groups)} param groups, the "
                                 f"engine's {len(base.param_groups)}; build the optimizer with the same "
                                 "param groups as the run that saved it")
    for group, hyper in zip(base.param_groups, groups):
        group.update({k: v for k, v in hyper.items() if k != "params"})
    opt = engine.optimizer
    for k, v in (saved.get("wrapper") or {}).items():
        if hasattr(opt, k):
            setattr(opt, k, v)
    scaler, mine = saved.get("loss_scaler"), getattr(opt, "loss_scaler", None)
    if scaler and mine is not None:
        if scaler["class"] != type(mine).__name__:
            log.warning("%s: loss scaler %s saved, engine uses %s; keeping the engine's", where,
                        scaler["class"], type(mine).__name__)
        else:
            for k, v in scaler["fields"].items():
                if hasattr(mine, k):
                    setattr(mine, k, v)


def restore_common(engine, base, state: dict, where: str, *, optimizer: bool, scheduler: bool,
                   counters: bool) -> dict:
    """Apply the saved common state; return the client state."""
    saved_opt = state.get("optimizer") or {}
    if optimizer and saved_opt and all(isinstance(g, dict) for g in saved_opt.get("param_groups") or [{}]):
        restore_optimizer(engine, base, saved_opt, where)
    elif optimizer and saved_opt:  # megatron's optimizer: its groups do not map onto the engine's
        log.info("%s: written by another framework's optimizer; keeping the engine's lr and weight "
                 "decay (the LR scheduler, when given, sets them)", where)
    if scheduler and engine.lr_scheduler is not None and state.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
    if counters:
        e = state.get("engine") or {}
        engine.global_steps = int(e.get("global_steps", state.get("iteration") or engine.global_steps))
        engine.global_samples = int(e.get("global_samples", engine.global_steps * engine.train_batch_size()))
        engine.skipped_steps = int(e.get("skipped_steps", engine.skipped_steps))
    return dict(state.get("client_state") or state.get("extra") or {})


def rank_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_rank(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
