"""``engine.load_checkpoint`` for ``"checkpoint": {"universal": true}``, on any DP size / ZeRO stage /
dtype: each rank plans its own buffers (``plan.zero``), reads exactly those element ranges of each
atom state from the source, writes them into the fp32 buffers and optimizer state, then lets DeepSpeed
refresh the low-precision parameters from the fp32 master (docs/deepspeed-internals.md).

A plain model read from a universal checkpoint goes describe -> plan -> execute: ``describe`` lists
every read of the rank as frozen ``Want``s (item and destination), ``UcpSource.read_batch`` plans
them all (``plan.reads.BatchPlan``, a value) and executes them as one pool straight into the
buffers. Other sources (native, ``ds_to_universal`` folders) and model-parallel bindings read
fragment by fragment.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ..async_save import wait as wait_for_async_save
from ..comm import Comm
from ..errors import StateMismatchError, UnsupportedError
from ..format import WEIGHT_STATE, Region
from ..plan import zero as Z
from ..plan.reads import ReadItem
from . import state as S
from .config import check_engine
from .engine_view import EngineView, base_optimizer, fp32_buffers, inspect_engine
from .optim_state import restore_entry
from .params import ParamMap
from .sources import has_latest, open_source

log = logging.getLogger(__name__)


def _gaps(b: Z.Buffer, names: set) -> list[tuple[int, int]]:
    """Element ranges of buffer ``b`` that no fragment of ``names`` fills (padding, frozen)."""
    out, cur = [], 0
    for f in sorted((f for f in b.fragments if f.name in names), key=lambda f: f.buffer_offset):
        if f.buffer_offset > cur:
            out.append((cur, f.buffer_offset))
        cur = max(cur, f.buffer_offset + f.length)
    return out + ([(cur, b.numel)] if cur < b.numel else [])


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 1-D view sharing its storage (engine buffers are contiguous)."""
    if not t.is_contiguous():
        raise UnsupportedError(f"a DeepSpeed optimizer buffer of shape {tuple(t.shape)} is not contiguous; "
                               "this DeepSpeed version lays out its buffers differently")
    return t.view(-1)


def _state_buffer(opt, t: torch.Tensor, key: str, dtype: torch.dtype) -> torch.Tensor:
    """Where optimizer state ``key`` of buffer ``t`` is read into: the live state tensor when it has
    the right size (DeepSpeed's views of it, optim_fragment, stay valid), else a new one. Never a
    zero-filled temporary: the fragments fill it and ``_gaps`` zeroes the rest."""
    live = opt.state.get(t, {}).get(key)
    if torch.is_tensor(live) and live.numel() == t.numel() and live.is_contiguous():
        return live.view(-1)
    return torch.empty(t.numel(), dtype=dtype, device=t.device)


@torch.no_grad()
def _read_buffer(source, view: EngineView, opt, b: Z.Buffer, t: torch.Tensor, trainable: set,
                 with_opt: bool) -> tuple[dict, dict]:
    """Read buffer ``b``'s fp32 master straight into the engine's tensor ``t`` and its optimizer
    states into their live tensors; returns (states, scalars) to install."""
    pmap, flat = view.params, _flat(t)
    states, steps, keys = {}, {}, None
    for f in b.fragments:
        if f.name not in trainable:
            continue
        lo, hi, at = f.param_offset, f.param_offset + f.length, slice(f.buffer_offset, f.buffer_offset + f.length)
        pmap.read_weight(source, f.name, lo, hi, t.dtype, out=flat[at])
        meta = pmap.atom(source, f.name)
        if not with_opt or meta.kind != "param":
            continue
        keys = _state_keys(meta, keys, source.path)
        for key in keys:
            if key not in states:
                states[key] = _state_buffer(opt, t, key, getattr(torch, meta.states[key]))
            pmap.read(source, f.name, key, lo, hi, states[key].dtype, out=states[key][at])
        for k, v in meta.scalars.items():
            steps.setdefault(k, {})[f.name] = v
    for lo, hi in _gaps(b, trainable):
        for dst in (flat, *states.values()):
            dst[lo:hi].zero_()
    return states, _one_scalar_each(steps, b)


def _state_keys(meta, keys: list | None, where: str) -> list:
    """``meta``'s optimizer states (fp32 master aside), which must be those of the buffer's other
    parameters (``keys``, None for the first): one flat buffer has one set of state tensors."""
    mine = sorted(k for k in meta.states if k != "fp32")
    if keys is not None and mine != keys:
        raise StateMismatchError(f"{where}: {meta.name!r} has optimizer states {mine}, another "
                                 f"parameter of the same ZeRO buffer {keys}; cannot merge them")
    return mine


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


MASTER = "master"  # a ``Want``'s destination: the buffer's flat fp32 master partition


@dataclass(frozen=True)
class Want:
    """One read of a rank's load: ``item`` goes to elements ``[offset, offset + item.numel)`` of
    buffer ``buffer``'s ``dest`` (``MASTER``, or the optimizer state of that name)."""
    item: ReadItem
    buffer: int
    dest: str
    offset: int


def describe(buffers, atoms: dict, trainable: set, with_opt: bool, where: str = "checkpoint") -> tuple[Want, ...]:
    """Every read that fills ``buffers`` (this rank's ``plan.zero`` buffers) from ``atoms`` of a
    plain DeepSpeed checkpoint (each parameter its own whole atom): pure, no engine, no I/O."""
    wants = []
    for b in buffers:
        keys = None
        for f in (f for f in b.fragments if f.name in trainable):
            meta, lo, hi = atoms[f.name], f.param_offset, f.param_offset + f.length
            region = Region.whole(meta.shape)
            wants.append(Want(ReadItem(f.name, WEIGHT_STATE[meta.kind], region, lo, hi), b.index, MASTER,
                              f.buffer_offset))
            if not with_opt or meta.kind != "param":
                continue
            keys = _state_keys(meta, keys, where)
            wants += [Want(ReadItem(f.name, k, region, lo, hi), b.index, k, f.buffer_offset) for k in keys]
    return tuple(wants)


def _load_batched(source, view: EngineView, opt, bufs: list, buffers: list, with_opt: bool) -> None:
    """A plain model from a universal checkpoint: describe every read, plan them all, execute them
    as one batch straight into the engine's buffers and live optimizer states."""
    trainable, atoms = set(view.trainable), source.atoms
    wants = describe(buffers, atoms, trainable, with_opt, source.path)
    states: dict[int, dict] = {b.index: {} for b in buffers}
    for w in wants:
        if w.dest != MASTER and w.dest not in states[w.buffer]:
            dtype = getattr(torch, atoms[w.item.atom].states[w.dest])
            states[w.buffer][w.dest] = _state_buffer(opt, bufs[w.buffer], w.dest, dtype)
    outs = [(_flat(bufs[w.buffer]) if w.dest == MASTER else states[w.buffer][w.dest])[w.offset:w.offset + w.item.numel]
            for w in wants]
    source.read_batch([w.item for w in wants], outs)
    for b in buffers:
        flat, mine = _flat(bufs[b.index]), states[b.index]
        for lo, hi in _gaps(b, trainable):
            for dst in (flat, *mine.values()):
                dst[lo:hi].zero_()
        if mine:
            scalars = {}
            for f in (f for f in b.fragments if f.name in trainable and atoms[f.name].kind == "param"):
                for k, v in atoms[f.name].scalars.items():
                    scalars.setdefault(k, {})[f.name] = v
            restore_entry(opt, bufs[b.index], mine, _one_scalar_each(scalars, b))


def batched(source, view: EngineView) -> bool:
    """Whether this load is planned as one batch: a universal source and a plain model (a binding's
    parameters are TP regions of global atoms and read through its map, fragment by fragment)."""
    return hasattr(source, "read_batch") and type(view.params) is ParamMap


def load_trainable(engine, view: EngineView, source, with_opt: bool) -> None:
    bufs, opt = fp32_buffers(engine, view.kind), base_optimizer(engine, view.kind)
    trainable = set(view.trainable)
    buffers = [b for b in view.layout.for_rank(view.rank)
               if any(f.name in trainable for f in b.fragments) or view.kind != Z.PER_PARAM]
    if batched(source, view):
        with torch.no_grad():
            _load_batched(source, view, opt, bufs, buffers, with_opt)
    else:
        for b in buffers:
            t = bufs[b.index]
            states, scalars = _read_buffer(source, view, opt, b, t, trainable, with_opt)
            if states:
                restore_entry(opt, t, states, scalars)
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
                    view.params.read_weight(source, name, lo, hi, p.ds_tensor.dtype, out=p.ds_tensor[:hi - lo])
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
    start = time.perf_counter()
    source = comm.run(lambda: open_source(load_dir, tag))
    opened = time.perf_counter() - start
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
    _report(source, view, opened)
    return source.path, client


def _check_source(engine, view: EngineView, source, strict: bool, with_opt: bool) -> None:
    view.params.check(source, view, strict)
    if with_opt:
        S.check_optimizer(base_optimizer(engine, view.kind), source.common_state(), source.path)


def _report(source, view: EngineView, opened: float) -> None:
    """Log what this rank fetched (``extra["ucp_load"]`` carries the numbers for tools and tests;
    ``phases``: seconds to open the source, then of the batched reads when the load was one batch)."""
    counts = source.bytes()
    if counts is None:
        return
    requested, fetched = counts
    ck = getattr(source, "checkpoint", None)  # a universal source also counts files and metadata
    files = ck.files_opened if ck is not None else None
    log.info("rank %d loaded %s: fetched %d bytes for the %d it needs", view.rank, source.path, fetched,
             requested, extra={"ucp_load": {"rank": view.rank, "dp": view.dp, "path": source.path,
                                            "requested": requested, "fetched": fetched, "files_opened": files,
                                            "metadata_bytes": ck.metadata_bytes if ck is not None else None,
                                            "phases": {"open": opened, **(getattr(source, "phases", None) or {})},
                                            "batched": getattr(source, "phases", None) is not None}})


def _restore_training_state(engine, view, source, with_opt, load_sched, module_only) -> dict:
    if module_only:
        return {}
    base = base_optimizer(engine, view.kind)
    client = S.restore_common(engine, base, source.common_state(), source.path, optimizer=with_opt,
                              scheduler=load_sched, counters=True)
    S.restore_rng(source, engine, view)
    return client
