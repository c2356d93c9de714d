"""``engine.load_checkpoint`` for ``"checkpoint": {"universal": true}``, on any DP size / ZeRO stage /
dtype: each rank plans its own buffers (``plan.zero``), reads exactly those element ranges of each
atom state from the source, writes them into the fp32 buffers and optimizer state, then lets DeepSpeed
refresh the low-precision parameters from the fp32 master (docs/deepspeed-internals.md).
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from ..async_save import wait as wait_for_async_save
from ..comm import Comm
from ..errors import StateMismatchError, UnsupportedError
from ..plan import zero as Z
from . import state as S
from .config import check_engine
from .engine_view import EngineView, base_optimizer, fp32_buffers, inspect_engine
from .sources import has_latest, open_source

log = logging.getLogger(__name__)


def _buffer_states(source, view: EngineView, b: Z.Buffer, trainable: set, with_opt: bool):
    """fp32 master, optimizer states and scalars of one buffer, assembled from its fragments."""
    pmap = view.params
    fp32 = torch.zeros(b.numel, dtype=torch.float32)
    states, steps, keys = {}, {}, None
    for f in b.fragments:
        if f.name not in trainable:
            continue
        lo, hi = f.param_offset, f.param_offset + f.length
        fp32[f.buffer_offset:f.buffer_offset + f.length] = pmap.read_weight(source, f.name, lo, hi,
                                                                            torch.float32)
        meta = pmap.atom(source, f.name)
        if not with_opt or meta.kind != "param":
            continue
        mine = sorted(k for k in meta.states if k != "fp32")
        if keys is not None and mine != keys:
            raise StateMismatchError(f"{source.path}: {meta.name!r} has optimizer states {mine}, another "
                                     f"parameter of the same ZeRO buffer {keys}; cannot merge them")
        keys = mine
        for key in mine:
            dst = states.setdefault(key, torch.zeros(b.numel, dtype=getattr(torch, meta.states[key])))
            dst[f.buffer_offset:f.buffer_offset + f.length] = pmap.read(source, f.name, key, lo, hi, dst.dtype)
        for k, v in meta.scalars.items():
            steps.setdefault(k, {})[f.name] = v
    return fp32, states, _one_scalar_each(steps, b)


def _one_scalar_each(scalars: dict, b: Z.Buffer) -> dict:
    """A flat buffer has one ``step``; stage 0 may have advanced parameters unevenly."""
    out = {}
    for key, by_param in scalars.items():
        values = set(by_param.values())
        if len(values) > 1:
            log.warning("parameters of ZeRO buffer %d saved different %r values %s; using the largest",
                        b.index, key, sorted(values))
        out[key] = max(values)
    return out


def _set_state(opt, t: torch.Tensor, states: dict, scalars: dict) -> None:
    entry = opt.state.get(t, {})
    for key, value in states.items():
        value = value.view(t.shape)
        if torch.is_tensor(entry.get(key)) and entry[key].shape == value.shape:
            entry[key].copy_(value)  # keeps DeepSpeed's views of the state (optim_fragment) valid
        else:
            entry[key] = value
    for key, value in scalars.items():
        old = entry.get(key)
        if torch.is_tensor(old):
            old.fill_(value)
        else:
            entry[key] = torch.tensor(float(value), dtype=torch.float32) if key == "step" else value
    opt.state[t] = entry


def load_trainable(engine, view: EngineView, source, with_opt: bool) -> None:
    bufs, opt = fp32_buffers(engine, view.kind), base_optimizer(engine, view.kind)
    trainable = set(view.trainable)
    for b in view.layout.for_rank(view.rank):
        if not any(f.name in trainable for f in b.fragments) and view.kind == Z.PER_PARAM:
            continue
        fp32, states, scalars = _buffer_states(source, view, b, trainable, with_opt)
        t = bufs[b.index]
        with torch.no_grad():
            t.copy_(fp32.view(t.shape).to(t.dtype))
        if states:
            _set_state(opt, t, states, scalars)
    if with_opt and hasattr(engine.optimizer, "_hp_optimizer_states_linked"):
        engine.optimizer._hp_optimizer_states_linked = False  # re-link lp params to the new states


def load_frozen(engine, view: EngineView, source) -> None:
    params = dict(engine.module.named_parameters())
    with torch.no_grad():
        for name in view.frozen:
            if not view.params.has(source, name):  # excluded at save, allowed by load_module_strict=False
                continue
            p = params[name]
            if hasattr(p, "ds_tensor"):  # ZeRO-3: only this rank's partition
                numel = p.ds_numel
                ps = Z.zero3_partition_numel(numel, view.dp)
                lo, hi = min(view.rank * ps, numel), min((view.rank + 1) * ps, numel)
                if hi > lo:
                    p.ds_tensor[:hi - lo].copy_(view.params.read_weight(source, name, lo, hi, p.ds_tensor.dtype))
            elif p.numel():
                p.copy_(view.params.read_weight(source, name, 0, p.numel(), p.dtype).view(p.shape))


def load_buffers(engine, view: EngineView, source) -> None:
    with torch.no_grad():
        for name in view.buffers:
            buf = engine.module.get_buffer(name)
            buf.copy_(view.params.read_weight(source, name, 0, buf.numel(), buf.dtype).view(buf.shape))


def refresh_low_precision(engine, view: EngineView) -> None:
    """Make the model's parameters equal to the fp32 master just written (collective)."""
    opt = engine.optimizer
    if view.kind in (Z.ZERO_FLAT, Z.BF16_FLAT):
        opt.update_lp_params()
    elif view.kind == Z.ZERO3:
        for sub_group_id in range(len(opt.fp16_groups)):
            opt._reassign_or_swap_out_partitioned_parameters(sub_group_id)


def load_checkpoint(engine, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                    load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
    """The universal replacement of ``DeepSpeedEngine.load_checkpoint``; returns (path, client_state)."""
    if custom_load_fn is not None:
        raise UnsupportedError("load_checkpoint(custom_load_fn=...) is not supported with "
                               '"checkpoint": {"universal": true}')
    check_engine(engine)
    wait_for_async_save()  # an asynchronous save still in flight is committed first: `latest` is current
    if tag is None and not has_latest(load_dir):
        log.warning("no 'latest' file in %s and no tag given: nothing loaded (as DeepSpeed does)", load_dir)
        return None, None
    view, comm = inspect_engine(engine), Comm()
    source = comm.run(lambda: open_source(load_dir, tag))
    with_opt = load_optimizer_states and not load_module_only
    comm.run(lambda: _check_source(engine, view, source, load_module_strict, with_opt))
    if view.kind == Z.ZERO3:
        engine.optimizer.checkpoint_event_prologue()
    comm.run(lambda: (load_trainable(engine, view, source, with_opt), load_frozen(engine, view, source),
                      load_buffers(engine, view, source)))
    refresh_low_precision(engine, view)
    if view.kind == Z.ZERO3:
        engine.optimizer.checkpoint_event_epilogue()
    client = comm.run(lambda: _restore_training_state(engine, view, source, with_opt, load_lr_scheduler_states,
                                                      load_module_only))
    engine.loaded_checkpoint_dp_world_size = getattr(source, "dp", None)
    engine.loaded_checkpoint_mp_world_size = getattr(source, "tp", 1)
    _report(source, view)
    return source.path, client


def _check_source(engine, view: EngineView, source, strict: bool, with_opt: bool) -> None:
    view.params.check(source, view, strict)
    if with_opt:
        S.check_optimizer(base_optimizer(engine, view.kind), source.common_state(), source.path)


def _report(source, view: EngineView) -> None:
    """Log what this rank fetched (``extra["ucp_load"]`` carries the numbers for tools and tests)."""
    counts = source.bytes()
    if counts is None:
        return
    requested, fetched = counts
    log.info("rank %d loaded %s: fetched %d bytes for the %d it needs", view.rank, source.path, fetched,
             requested, extra={"ucp_load": {"rank": view.rank, "dp": view.dp, "path": source.path,
                                            "requested": requested, "fetched": fetched}})


def _restore_training_state(engine, view, source, with_opt, load_sched, module_only) -> dict:
    if module_only:
        return {}
    base = base_optimizer(engine, view.kind)
    client = S.restore_common(engine, base, source.common_state(), source.path, optimizer=with_opt,
                              scheduler=load_sched, counters=True)
    rng = source.rank_state(dist.get_rank(), dist.get_world_size())
    if rng is not None:
        S.restore_rank(rng)
    return client
