"""``engine.save_checkpoint`` for ``"checkpoint": {"universal": true}``: every rank writes only what it
holds, as pieces of atoms (docs/FORMAT.md).

- trainable parameters: each fragment of this rank's fp32 buffers, with the same range of every
  optimizer state of that buffer (``exp_avg``, ``exp_avg_sq``, ...) and the buffer's scalars (``step``);
  padding is never written. Stage 0 holds everything everywhere, so rank r writes the r-th of ``dp``
  near-equal slices of each parameter (the ZeRO-3 split) and no byte is written twice;
- frozen parameters: the same split (ZeRO-3: each rank's own ``ds_tensor`` elements);
- buffers, LR scheduler, engine counters, optimizer hyperparameters, loss scaler, client state: rank 0;
- RNG states: every rank.

With ``"checkpoint": {"universal": true, "async": true}`` the same is snapshotted into host memory and
written in the background (``ucp_plugin.async_save``).
"""
from __future__ import annotations

import deepspeed

from ..comm import Comm
from ..format import Atom, Layout, Region, dtype_name
from ..plan import zero as Z
from ..session import SaveHeader, save_universal
from ..storage import ShardWriter
from . import params
from . import state as S
from .config import check_engine, read_config
from .engine_view import EngineView, base_optimizer, fp32_buffers, inspect_engine
from .optim_state import split_state

SPLIT = params.SPLIT


def write_trainable(writer: ShardWriter, engine, view: EngineView) -> None:
    bufs, opt = fp32_buffers(engine, view.kind), base_optimizer(engine, view.kind)
    trainable = set(view.trainable)
    for b in view.layout.for_rank(view.rank):
        t = bufs[b.index]
        tensors, scalars = split_state(opt.state.get(t, {}), t.numel(), f"rank {view.rank} buffer {b.index}")
        tensors = {"fp32": t.detach().reshape(-1), **tensors}
        for f in b.fragments:
            # stage 0 keeps frozen params in the torch optimizer; a TP replica may be another rank's
            if f.name not in trainable or not view.params.writes(f.name):
                continue
            lo, hi = (0, f.length) if not view.layout.replicated else Z.even_share(f.length, view.rank, view.dp)
            start = f.buffer_offset + lo
            view.params.write(writer, f.name, "param", f.param_offset + lo,
                              {k: v[start:start + hi - lo] for k, v in tensors.items()}, scalars)


def write_frozen(writer: ShardWriter, engine, view: EngineView) -> None:
    params = dict(engine.module.named_parameters())
    for name in view.frozen:
        if not view.params.writes(name):
            continue
        p = params[name]
        lo, hi = Z.even_share(_numel(p), view.rank, view.dp)
        local = p.ds_tensor.detach()[:max(hi - lo, 0)] if hasattr(p, "ds_tensor") \
            else p.detach().reshape(-1)[lo:max(lo, hi)]
        view.params.write(writer, name, "frozen", lo, {"param": local}, {})


def _numel(p) -> int:
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


def write_buffers(writer: ShardWriter, engine, view: EngineView) -> None:
    for name in view.buffers:
        buf = engine.module.get_buffer(name)
        shape = tuple(buf.shape)
        writer.add_atom(Atom(name, "buffer", shape, SPLIT, {"param": dtype_name(buf.dtype)}, {}))
        writer.add(name, "param", buf, Region.whole(shape), 0)


def save_checkpoint(engine, save_dir, tag=None, client_state=None, save_latest=True,
                    exclude_frozen_parameters=False) -> bool:
    """The universal replacement of ``DeepSpeedEngine.save_checkpoint`` (same arguments)."""
    check_engine(engine)
    view = inspect_engine(engine)
    pmap = view.params
    tag = f"global_step{engine.global_steps}" if tag is None else str(tag)
    layout = pmap.layout(Layout(dp=view.dp, zero_stage=view.stage, param_dtype=view.param_dtype))
    header = SaveHeader(pmap.adapter, pmap.adapter_version, "deepspeed", deepspeed.__version__, layout,
                        family=pmap.family, iteration=engine.global_steps, model=pmap.model_info())
    meta = {"kind": view.kind, "dp": view.dp, "zero_stage": view.stage, "param_dtype": view.param_dtype}

    def fill(writer: ShardWriter) -> None:
        write_trainable(writer, engine, view)
        if not exclude_frozen_parameters:
            write_frozen(writer, engine, view)
        if view.rank == 0:
            write_buffers(writer, engine, view)
            base = base_optimizer(engine, view.kind)
            writer.save_state(S.common_state(engine, base, client_state or {}, meta), common=True)
        writer.save_state(S.rank_state())

    # "async": true returns once this rank's state is in host memory (ucp_plugin.async_save); the
    # checkpoint is committed at the next save, load, ucp_plugin.poll() or ucp_plugin.wait()
    cfg = read_config(engine._config._param_dict)
    save_universal(Comm(), str(save_dir), tag, header, fill, update_latest=save_latest,
                   asynchronous=cfg.asynchronous, on_busy=cfg.on_busy)
    return True
