"""Training state besides the tensors: engine counters, LR scheduler, optimizer hyperparameters and
loss scaler (one copy, ``state/common``), and each rank's RNG (``state/rank-N``: Python, NumPy, torch's
CPU generator and every visible accelerator's; restored on the same layout, re-seeded after a reshard,
see ``restore_rng`` and docs/deepspeed-internals.md).

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
from ..format import Layout

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


# Optimizers whose states mean the same (exp_avg, exp_avg_sq, step of Adam): torch's, DeepSpeed's fused
# one and its CPU one under ZeRO-Offload, so a run may move between them (offload on or off).
ADAM_FAMILY = frozenset({"Adam", "AdamW", "FusedAdam", "DeepSpeedCPUAdam"})
# hyperparameters every member of the family reads alike; implementation flags (foreach, fused,
# capturable, adam_w_mode, ...) stay the target's own when the class changes
_SHARED_HYPER = ("lr", "initial_lr", "betas", "eps", "weight_decay", "step")


def same_states(saved: str, mine: str) -> bool:
    return saved == mine or {saved, mine} <= ADAM_FAMILY


def check_optimizer(base, state: dict, where: str) -> None:
    """Refuse optimizer states saved by an optimizer whose states mean something else (an SGD momentum
    buffer is no Adam state). Native DeepSpeed checkpoints do not record the class."""
    saved = (state.get("optimizer") or {}).get("class")
    if saved is not None and not same_states(saved, type(base).__name__):
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
            "rng": {"seed": torch.initial_seed()},  # re-seeds every rank after a reshard (restore_rng)
            "source": meta}


def restore_optimizer(engine, base, saved: dict, where: str) -> None:
    groups = saved.get("param_groups") or []
    if len(groups) != len(base.param_groups):
        raise StateMismatchError(f"{where}: the checkpoint's optimizer has {len(groups)} param groups, the "
                                 f"engine's {len(base.param_groups)}; build the optimizer with the same "
                                 "param groups as the run that saved it")
    same_class = saved.get("class") in (None, type(base).__name__)
    if not same_class:
        log.info("%s: optimizer states of %s loaded into %s; restoring only %s of its param groups", where,
                 saved["class"], type(base).__name__, ", ".join(_SHARED_HYPER))
    for group, hyper in zip(base.param_groups, groups):
        # a per-group "step" (FusedAdam's, which seeds new states) only where the target keeps one
        group.update({k: v for k, v in hyper.items() if k != "params" and (k != "step" or k in group)
                      and (same_class or k in _SHARED_HYPER)})
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


def _device_rng() -> dict | None:
    """Every visible accelerator's RNG state (dropout on CUDA draws from these, not the CPU generator)."""
    if torch.cuda.is_available():
        return {"device": "cuda", "states": list(torch.cuda.get_rng_state_all())}
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    if acc.device_name() == "cpu":  # the CPU accelerator's generator is torch's default one
        return None
    return {"device": acc.device_name(), "states": [acc.get_rng_state(i) for i in range(acc.device_count())]}


def _set_device_rng(saved: dict, where: str) -> None:
    mine = _device_rng()
    if mine is None or mine["device"] != saved["device"] or len(mine["states"]) != len(saved["states"]):
        log.warning("%s: RNG states of %d %s device(s) saved, this rank sees %s; their dropout streams are "
                    "not restored", where, len(saved["states"]), saved["device"],
                    "none" if mine is None else f'{len(mine["states"])} {mine["device"]}')
        return
    if saved["device"] == "cuda":
        torch.cuda.set_rng_state_all(saved["states"])
        return
    from deepspeed.accelerator import get_accelerator
    for i, state in enumerate(saved["states"]):
        get_accelerator().set_rng_state(state, i)


def rank_state() -> dict:
    """This rank's RNG: Python, NumPy, torch's CPU generator and every visible accelerator's."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    device = _device_rng()
    if device is not None:
        state["device"] = device
    return state


def restore_rank(state: dict, where: str = "checkpoint") -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("device"):
        _set_device_rng(state["device"], where)


def reseed(seed: int, step: int, rank: int) -> int:
    """Seed every generator of this rank from the run's seed, the step and the rank (after a reshard):
    deterministic, different per rank and from the masks the run drew at its start."""
    derived = (int(seed) + 1_000_003 * int(step) + int(rank)) % 2**63
    random.seed(derived)
    np.random.seed(derived % 2**32)
    torch.manual_seed(derived)  # also seeds every CUDA device (torch.cuda.manual_seed_all)
    return derived


def restore_rng(source, engine, view) -> str:
    """Resume each rank's RNG streams: restored when the checkpoint was written by the same world size,
    DP and TP (each rank continues its own streams bit-exactly); else re-seeded from the saved seed
    (``reseed``); kept as they are when the checkpoint has none (native DeepSpeed saves no RNG).
    Returns what was done: "restored", "reseeded" or "kept"."""
    import torch.distributed as dist
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = view.params.layout(Layout(dp=view.dp, zero_stage=view.stage, param_dtype=view.param_dtype))
    same = (getattr(source, "dp", None), getattr(source, "tp", 1)) == (mine.dp, mine.tp)
    saved = source.rank_state(rank, world) if same else None
    if saved is not None:
        restore_rank(saved, source.path)
        return "restored"
    seed = ((source.common_state() or {}).get("rng") or {}).get("seed")
    if seed is None:
        return "kept"
    derived = reseed(seed, engine.global_steps, rank)
    log.info("%s: written by another layout (DP %s, TP %s; now DP %d, TP %d): rank %d re-seeded its RNG "
             "with %d (saved seed %d, step %d)", source.path, getattr(source, "dp", None),
             getattr(source, "tp", 1), mine.dp, mine.tp, rank, derived, seed, engine.global_steps)
    return "reseeded"
