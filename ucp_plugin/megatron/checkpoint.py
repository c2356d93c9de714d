"""Save and load universal checkpoints of megatron-core GPT models (docs/FORMAT.md), at any layout.

Save: every rank writes only what it holds, as pieces of atoms named globally through the family's
spec (``model_view``): for each parameter, the fp32 master and every optimizer state over the range
of the TP-local tensor this rank owns (``optimizer_view``: the DistributedOptimizer's DP shard; with
a non-distributed optimizer, the r-th of DP near-equal slices so no byte is written twice), plus the
scalar states (``step``). A TP-replicated parameter is written by TP rank 0 (all TP ranks when its
split's ``reduce`` is "check"/"average"); a tied output layer is not written (it is the embedding's
atom); vocabulary padding rows are never written. A ``Blocks`` parameter (megatron's legacy
GroupedMLP: all local experts in one tensor) is written to the atoms of its segments, each block's
part of the range in that atom's canonical order (``plan.segments``), and read back the same way.
Persistent module buffers (the MoE router's ``expert_bias``) are ``buffer`` atoms, written by TP
rank 0 of DP rank 0 of each stage. Rank 0 writes the common state (iteration, scheduler, optimizer
hyper-parameters, grad scaler, caller's extra state, the job's seed); every rank its RNG states.

RNG. Each rank saves its Python, NumPy, torch CPU and CUDA generators (every visible device) and
megatron's ``CudaRNGStatesTracker`` streams (the model-parallel stream dropout uses inside TP
regions, the expert stream, ...). A load at the same TP/PP/EP/expert-TP grid and world size restores
them rank by rank: a resume with dropout continues bit-exactly. On another layout a rank has no
saved counterpart (a TP rank's stream is seeded from its TP rank), so every rank is re-seeded as
Megatron-LM seeds a fresh job (``_set_random_seed``: ``seed + 100 * pp_rank``, then
``model_parallel_cuda_manual_seed``, which offsets the TP and expert streams), from the saved seed
plus ``1_000_000 * iteration`` so the masks do not replay those of the job's first steps. So after a
reshard dropout is deterministic (the same checkpoint resumed at the same layout draws the same
masks) but not the masks the uninterrupted run would have drawn: losses agree statistically, not
bitwise (with dropout off, exactly as before).

Load, on any TP/PP/DP/EP/SP layout and either optimizer kind: each rank reads the region of each atom
its local tensor is (padding rows read as zeros), sets the model parameter, its master and (when the
checkpoint has them and an optimizer is given) the optimizer states of the range it owns, each
parameter with its own ``step``. With the DistributedOptimizer a rank reads a trained parameter only
over the range it owns (its master shard) and megatron's DP all-gather assembles the model parameters
(``optimizer_view.assemble_model_params``): the DP group reads each stored weight byte once.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..async_save import wait as wait_for_async_save
from ..comm import Comm
from ..errors import StateMismatchError
from ..format import WEIGHT_STATE, Atom, Layout, Region, dtype_name
from ..language import Replicated
from ..models.config import ModelConfig
from ..session import SaveHeader, save_universal as run_save
from ..storage import Checkpoint, ShardWriter
from . import optimizer_view as O
from . import vocab_padding as P
from ..plan.zero import even_share
from .model_view import (BufferEntry, ParamEntry, as_chunks, buffer_entries, layers_per_stage, megatron_lm_vocab,
                         param_entries, resolve_spec, unwrap)
from .validate import validate_layout

log = logging.getLogger(__name__)
ADAPTER, ADAPTER_VERSION = "megatron.core", "1"
_HYPER_TYPES = (int, float, bool, str, type(None))
PAD_SPLIT = Replicated().to_json()  # a padding atom is read by explicit row ranges, never planned by split


@dataclass(frozen=True)
class RankView:
    """This rank's model in the checkpoint language."""
    family: str
    config: ModelConfig
    entries: tuple[ParamEntry, ...]
    layout: Layout
    padded_vocab: int | None = None  # set when the true vocabulary size is unknown (``vocab_padding``)
    buffers: tuple[BufferEntry, ...] = ()


def inspect_model(chunks: list, optimizer, family=None, config=None, vocab=None) -> RankView:
    from megatron.core import parallel_state as ps

    known = config is not None or bool(vocab) or bool(megatron_lm_vocab()[0])
    family, config, spec = resolve_spec(chunks, family, config, vocab)
    tconfig = unwrap(chunks[0]).config
    param_dtype = dtype_name(next(unwrap(chunks[0]).parameters()).dtype)
    layout = Layout(tp=ps.get_tensor_model_parallel_world_size(),
                    pp=ps.get_pipeline_model_parallel_world_size(),
                    dp=ps.get_data_parallel_world_size(), ep=ps.get_expert_model_parallel_world_size(),
                    sp=bool(tconfig.sequence_parallel),
                    zero_stage=1 if optimizer is not None and O.is_distributed(optimizer) else 0,
                    param_dtype=param_dtype, layers_per_stage=layers_per_stage(chunks),
                    # a dense model has no expert layers, so no expert-TP size to record
                    etp=ps.get_expert_tensor_parallel_world_size() if config.experts else None)
    return RankView(family, config, tuple(param_entries(chunks, spec, config)), layout,
                    None if known else config.vocab, tuple(buffer_entries(chunks, spec, config)))


# ------------------------------------------------------------------------------------------- save

def writes(e: ParamEntry) -> int | None:
    """The replica index this rank writes for ``e``, or None when another rank writes it."""
    if e.tied_to:
        return None
    if isinstance(e.split, Replicated):
        if e.split.reduce == "first":
            return 0 if e.tp_rank == 0 else None
        return e.tp_rank
    return 0


def _pieces(e: ParamEntry, master: O.Master | None) -> tuple[int, int, dict, dict]:
    """(start, stop, {state: 1-D tensor of local elements [start, stop)}, scalars) this rank writes."""
    if master is not None and master.distributed:
        start, stop = master.start, master.stop
    else:
        start, stop = even_share(e.param.numel(), e.dp_rank, e.dp)
    if master is None:
        flat = e.param.detach().reshape(-1)[start:stop]
        key = "fp32" if e.param.requires_grad else "param"
        return start, stop, {key: flat.float() if key == "fp32" else flat}, {}
    lo, hi = start - master.start, stop - master.start
    tensors = {"fp32": master.main[lo:hi]}
    tensors.update({k: v.reshape(-1)[lo:hi] for k, v in O.tensor_states(master.state).items()})
    return start, stop, tensors, O.scalar_states(master)


def _add(writer: ShardWriter, info: Atom, tensors: dict, region, start: int, replica: int) -> None:
    writer.add_atom(info)
    for key, flat in tensors.items():
        writer.add(info.name, key, flat, region, start, replica)


def _info(name: str, kind: str, shape, split: dict, tensors: dict, scalars: dict) -> Atom:
    return Atom(name, kind, tuple(shape), split, {k: dtype_name(v.dtype) for k, v in tensors.items()}, scalars)


def write_params(writer: ShardWriter, view: RankView, optimizer) -> None:
    owned = O.masters(optimizer) if optimizer is not None else {}
    distributed = optimizer is not None and O.is_distributed(optimizer)
    for e in view.entries:
        replica = writes(e)
        master = owned.get(e.param)
        if replica is None or (distributed and e.param.requires_grad and master is None):
            continue  # another rank writes it (TP rank 0, the DP rank owning the shard)
        start, stop, tensors, scalars = _pieces(e, master)
        write_entry(writer, e, start, stop, tensors, scalars, replica)


def write_entry(writer: ShardWriter, e: ParamEntry, start: int, stop: int, tensors: dict, scalars: dict,
                replica: int) -> None:
    """Write local elements [start, stop) of ``e`` (each state in ``tensors``, 1-D): real elements to
    the parameter's atom (or, for a Blocks parameter, to the atoms of the segments the range
    touches), vocabulary padding rows to its padding atom."""
    kind, real = ("param" if e.param.requires_grad else "frozen"), e.real_numel
    if e.segments:
        _write_segments(writer, e, start, stop, tensors, scalars, replica, kind)
        return
    if min(stop, real) > start:
        part = {k: v[:min(stop, real) - start] for k, v in tensors.items()}
        info = _info(e.global_name, kind, e.global_shape, e.split.to_json(), part, scalars)
        _add(writer, info, part, e.region, start, replica)
    if stop > max(start, real) and P.padded(e):
        part = {k: v[max(start, real) - start:] for k, v in tensors.items()}
        info = _info(P.atom_name(e.global_name), kind, P.atom_shape(e), PAD_SPLIT, part, scalars)
        _add(writer, info, part, P.region(e), max(start, real) - real, replica)


def _write_segments(writer: ShardWriter, e: ParamEntry, start: int, stop: int, tensors: dict, scalars: dict,
                    replica: int, kind: str) -> None:
    """Each segment's part of [start, stop) as pieces of its atom, declared with the atom's own split
    (what the per-expert SequentialMLP parameter writes)."""
    for seg in e.segments:
        cut = seg.overlap(start, stop)
        if cut is None:
            continue
        part = {k: v[cut[0] - start:cut[1] - start] for k, v in tensors.items()}
        writer.add_atom(_info(seg.atom, kind, seg.shape, e.split.inner.to_json(), part, scalars))
        for key, flat in part.items():
            writer.add(seg.atom, key, flat, seg.region, cut[0] - seg.offset, replica, seg.order)


def write_buffers(writer: ShardWriter, view: RankView) -> None:
    for b in view.buffers:
        if b.writes:
            shape = tuple(b.tensor.shape)
            writer.add_atom(Atom(b.global_name, "buffer", shape, PAD_SPLIT, {"param": dtype_name(b.tensor.dtype)}, {}))
            writer.add(b.global_name, "param", b.tensor.detach(), Region.whole(shape), 0)


def optimizer_hyper(optimizer) -> list[list[dict]]:
    """Each inner optimizer's param-group hyper-parameters (lr, betas, weight decay, multipliers)."""
    return [[{k: v for k, v in g.items() if k != "params" and _plain(v)} for g in o.optimizer.param_groups]
            for o in O.inner_optimizers(optimizer)]


def _plain(v) -> bool:
    if isinstance(v, tuple):
        return all(isinstance(x, _HYPER_TYPES) for x in v)
    return isinstance(v, _HYPER_TYPES)


def common_state(view, optimizer, iteration, scheduler_state, extra_state) -> dict:
    saved_opt = None
    if optimizer is not None:
        scaler = getattr(optimizer, "grad_scaler", None)
        saved_opt = {"param_groups": optimizer_hyper(optimizer),
                     "grad_scaler": scaler.state_dict() if scaler else None}
    return {"iteration": iteration, "scheduler": scheduler_state, "extra": extra_state, "optimizer": saved_opt,
            "family": view.family, "model_config": asdict(view.config),
            "rng_seed": torch.initial_seed()}  # rank 0's torch seed: what a reshard re-seeds from


def rank_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "rng_tracker": dict(get_cuda_rng_tracker().get_states())}
    try:
        state["cuda"] = torch.cuda.get_rng_state()
    except (RuntimeError, AssertionError):  # no CUDA and no CPU shim
        state["cuda"] = None
    if torch.cuda.is_available():  # every device this process may have drawn on, not only the current one
        state["cuda_all"] = torch.cuda.get_rng_state_all()
    return state


def model_info(config: ModelConfig, padded_vocab: int | None = None) -> dict:
    """The manifest's ``model``: what ``validate.validate_layout`` checks a target layout against
    (``padded_vocab``: the vocabulary atoms hold that many rows, the true size unknown)."""
    info = {"num_layers": config.layers, "num_experts": config.experts, "num_heads": config.heads,
            "num_query_groups": config.groups, "config": asdict(config)}
    return info if padded_vocab is None else {**info, "padded_vocab": padded_vocab}


def save_universal(model, optimizer, save_dir: str, tag: str, iteration: int | None = None,
                   scheduler_state: dict | None = None, extra_state: dict | None = None, *,
                   family: str | None = None, config: ModelConfig | None = None, vocab: int | None = None,
                   update_latest: bool = True, async_save: bool = False, on_busy: str = "wait") -> str:
    """Every rank calls this; returns ``<save_dir>/<tag>``. ``optimizer=None`` saves weights only.
    ``async_save``: return once this rank's state is in host memory; the folder appears when the save
    is committed, at the next save or load, ``ucp_plugin.poll()`` or ``ucp_plugin.wait()``
    (``ucp_plugin.async_save``; ``on_busy`` says what a save does while one is still in flight)."""
    import megatron.core

    chunks, comm = as_chunks(model), Comm()
    view = comm.run(lambda: inspect_model(chunks, optimizer, family, config, vocab))
    header = SaveHeader(ADAPTER, ADAPTER_VERSION, "megatron-core", megatron.core.__version__, view.layout,
                        family=view.family, iteration=iteration,
                        model=model_info(view.config, view.padded_vocab))

    def fill(writer: ShardWriter) -> None:
        write_params(writer, view, optimizer)
        write_buffers(writer, view)
        if comm.rank == 0:
            writer.save_state(common_state(view, optimizer, iteration, scheduler_state, extra_state),
                              common=True)
        writer.save_state(rank_state())

    return run_save(comm, str(save_dir), str(tag), header, fill, update_latest=update_latest,
                    asynchronous=async_save, on_busy=on_busy)


# ------------------------------------------------------------------------------------------- load

def check_atoms(ck: Checkpoint, view: RankView) -> None:
    """Every local parameter has its atom(s), with the shape this model expects."""
    stored = {a.name: a for a in ck.top.atoms}
    wanted = [atom for e in view.entries for atom in e.atoms]
    missing = sorted({name for name, _ in wanted if name not in stored})
    if missing:
        raise StateMismatchError(f"{ck.path}: the model has {len(missing)} parameter(s) the checkpoint "
                                 f"lacks, e.g. {missing[:5]}; is it the same model (family "
                                 f"{view.family!r}, {view.config})?")
    bad = [(name, list(stored[name].shape), list(shape)) for name, shape in wanted
           if tuple(stored[name].shape) != tuple(shape) and not P.holds_padding(ck.top, name, shape)]
    if bad:
        raise StateMismatchError(f"{ck.path}: shape mismatch (atom, checkpoint, this model): {bad[:5]}; "
                                 "check the ModelConfig (vocab, ffn, heads, query groups)")


def has_optimizer_states(ck: Checkpoint) -> bool:
    return any(set(a.states) - {"fp32"} for a in ck.top.atoms if a.kind == "param")


def read_local(ck: Checkpoint, e: ParamEntry, state: str, start: int, stop: int, dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Local elements [start, stop) of ``e``'s ``state``, vocabulary padding rows included (into
    ``out`` when given, with no temporary)."""
    if e.segments:
        out = torch.zeros(stop - start, dtype=dtype) if out is None else out.zero_()
        for seg in e.segments:
            cut = seg.overlap(start, stop)
            if cut is not None:
                ck.read_fragment(seg.atom, state, seg.region, cut[0] - seg.offset, cut[1] - seg.offset, dtype,
                                 seg.order, out=out[cut[0] - start:cut[1] - start])
        return out
    out = ck.read_fragment(e.source, state, e.region, start, stop, dtype, out=out)
    P.overlay(ck, e, state, start, out)
    return out


def _load_states(ck: Checkpoint, e: ParamEntry, master: O.Master, with_opt: bool) -> None:
    """The optimizer states of the master's range (when loading them) and its scalars."""
    if not with_opt:
        return
    atoms = [ck.top.atom(name) for name, _ in e.atoms]  # kind, states, scalars: no shard index read
    for key, live in O.tensor_states(master.state).items():
        lacking = next((a for a in atoms if key not in a.states), None)
        if lacking is not None:
            raise StateMismatchError(f"{ck.path}: parameter {lacking.name!r} has no optimizer state {key!r} "
                                     f"(it has {sorted(lacking.states)}); load with the optimizer that saved "
                                     "it, or without optimizer state")
        if live.is_contiguous():
            read_local(ck, e, key, master.start, master.stop, live.dtype, out=live.view(-1))
        else:
            live.copy_(read_local(ck, e, key, master.start, master.stop, live.dtype).view(live.shape))
    O.set_scalars(master, _scalars(ck.path, e, atoms))


def _scalars(path: str, e: ParamEntry, atoms: list) -> dict:
    """The scalar states of the master of ``e``; the atoms of a Blocks parameter share one master,
    so they must agree (they do when one optimizer saved them)."""
    if any(a.scalars != atoms[0].scalars for a in atoms):
        raise StateMismatchError(f"{path}: the atoms of {e.global_name!r} ({[a.name for a in atoms][:4]}...) "
                                 f"have different scalar optimizer states ({[a.scalars for a in atoms][:4]}); "
                                 "one master cannot take them all: load without optimizer state")
    return atoms[0].scalars


@torch.no_grad()
def load_params(ck: Checkpoint, view: RankView, optimizer, with_opt: bool) -> None:
    """Each parameter's weight, and the master and optimizer states of the range this rank owns.
    A parameter the DistributedOptimizer all-gathers is read only over that range, into the master
    (``O.assemble_model_params`` then sets the model parameter); any other is read whole."""
    owned = O.masters(optimizer) if optimizer is not None else {}
    gathered = O.gathered_params(optimizer) if optimizer is not None else set()
    for e in view.entries:
        kind = ck.top.atom(e.atoms[0][0]).kind  # check_atoms found them all
        weight, master = WEIGHT_STATE[kind], owned.get(e.param)
        if id(e.param) in gathered:
            if master is not None:
                read_local(ck, e, weight, master.start, master.stop, torch.float32, out=master.main)
                _load_states(ck, e, master, with_opt and kind == "param")
            continue
        whole = read_local(ck, e, weight, 0, e.param.numel(), torch.float32)
        e.param.copy_(whole.view(e.param.shape))
        if master is not None:
            master.main.copy_(whole[master.start:master.stop])
            _load_states(ck, e, master, with_opt and kind == "param")


@torch.no_grad()
def load_buffers(ck: Checkpoint, view: RankView, strict: bool) -> None:
    """Every persistent buffer from its atom (copied into the live buffer, on its device)."""
    stored = {a.name for a in ck.top.atoms if a.kind == "buffer"}
    missing = [b.global_name for b in view.buffers if b.global_name not in stored]
    if missing and strict:
        raise StateMismatchError(f"{ck.path}: the model has buffer(s) the checkpoint lacks: {missing[:5]}; "
                                 "was it saved before buffers were (or from another model)? pass strict=False "
                                 "to keep the model's own")
    for b in (b for b in view.buffers if b.global_name in stored):
        shape = tuple(b.tensor.shape)
        b.tensor.copy_(ck.read_fragment(b.global_name, "param", Region.whole(shape), 0, b.tensor.numel(),
                                        b.tensor.dtype).view(shape))


def _counted(view: RankView) -> int:
    """Atoms this rank is the designated reader of (TP rank 0, DP rank 0): summed over ranks, each
    atom the model uses is counted once."""
    return len({name for e in view.entries if not e.tied_to and e.tp_rank == 0 and e.dp_rank == 0
                for name, _ in e.atoms})


def restore_optimizer_hyper(optimizer, saved: list[list[dict]]) -> None:
    """lr and weight decay per param group, matched on the group's other hyper-parameters (the groups
    differ by layout: with EP > 1 expert parameters get their own optimizer). A scheduler restored
    afterwards sets them again from its own state."""
    # megatron saves one list per inner optimizer, the DeepSpeed engine path one list of groups
    pool = [g for groups in saved for g in (groups if isinstance(groups, list) else [groups])]
    volatile = {"lr", "weight_decay", "is_expert_parallel", "step"}
    for opt in O.inner_optimizers(optimizer):
        for group in opt.optimizer.param_groups:
            sig = {k: v for k, v in group.items() if k not in volatile and k != "params" and _plain(v)}
            match = next((g for g in pool if {k: g.get(k) for k in sig} == sig), None)
            if match is None:
                log.warning("no saved param group matches %s; keeping its lr/weight decay", sig)
                continue
            group.update({k: match[k] for k in ("lr", "weight_decay") if k in match})


def restore_rank_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("cuda_all") is not None and len(state["cuda_all"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda_all"])
    get_cuda_rng_tracker().set_states(dict(state["rng_tracker"]))


def reseed(seed: int, iteration: int) -> None:
    """A layout change: seed this rank as Megatron-LM seeds a job, from the saved seed and the
    iteration (see the module docstring)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    seed = seed + 1_000_000 * iteration + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def _rng_grid(layout: Layout) -> tuple[int, ...]:
    """What a rank's RNG states depend on: its place in the TP, expert-TP, EP and PP groups."""
    return layout.world_size, layout.tp, layout.pp, layout.ep, layout.expert_tp


def restore_state(ck: Checkpoint, view: RankView, optimizer, rank: int, with_opt: bool) -> dict:
    common = ck.load_state() if ck.has_state() else {}
    saved_opt = common.get("optimizer") or {}
    if with_opt and saved_opt.get("param_groups"):
        restore_optimizer_hyper(optimizer, saved_opt["param_groups"])
    scaler = getattr(optimizer, "grad_scaler", None) if with_opt else None
    if scaler is not None and saved_opt.get("grad_scaler"):
        scaler.load_state_dict(saved_opt["grad_scaler"])
    same = _rng_grid(ck.top.layout) == _rng_grid(view.layout)
    iteration = common.get("iteration", ck.top.iteration)
    if same and ck.has_state(rank):
        restore_rank_state(ck.load_state(rank))
    elif common.get("rng_seed") is not None:
        log.info("layout changed (%s -> %s): RNG re-seeded from the saved seed %d at iteration %s",
                 ck.top.layout.describe(), view.layout.describe(), common["rng_seed"], iteration)
        reseed(common["rng_seed"], iteration or 0)
    else:
        log.warning("layout changed and the checkpoint records no seed: RNG states are left as they are")
    return {"iteration": iteration,
            "scheduler_state": common.get("scheduler"), "extra_state": common.get("extra")}


def load_universal(model, optimizer, load_dir: str, tag: str | None = None, verify: bool = True, *,
                   family: str | None = None, config: ModelConfig | None = None, vocab: int | None = None,
                   strict: bool = True) -> dict:
    """Every rank calls this. Returns {"iteration", "scheduler_state", "extra_state"}. The optimizer
    states are loaded when ``optimizer`` is given and the checkpoint has them."""
    wait_for_async_save()  # one still in flight is committed first, so `latest` is current
    chunks, comm = as_chunks(model), Comm()
    path = os.path.join(str(load_dir), tag) if tag else str(load_dir)
    ck = comm.run(lambda: Checkpoint.open(path, verify))
    if config is None and not vocab and not megatron_lm_vocab()[0]:
        vocab = comm.run(lambda: P.vocab_to_load(ck, unwrap(chunks[0]).vocab_size))
    view = comm.run(lambda: inspect_model(chunks, optimizer, family, config, vocab))
    if (ck.top.model or {}).get("config"):  # the manifest records the model: check the layout first
        comm.run(lambda: validate_layout(ck.top, view.layout))
    comm.run(lambda: check_atoms(ck, view))
    with_opt = optimizer is not None and has_optimizer_states(ck)
    if with_opt:
        O.ensure_state(optimizer)
    comm.run(lambda: load_params(ck, view, optimizer, with_opt))
    if optimizer is not None and O.is_distributed(optimizer):
        O.assemble_model_params(optimizer)  # collective: megatron's DP all-gather of the param buffer
    comm.run(lambda: load_buffers(ck, view, strict))
    used = comm.all_sum(_counted(view))
    stored = sum(1 for a in ck.top.atoms if a.kind in ("param", "frozen") and not a.name.endswith(P.SUFFIX))
    if strict and used != stored:
        raise StateMismatchError(f"{ck.path}: the checkpoint has {stored} parameters, this model uses "
                                 f"{used}; inspect both (ucp inspect) or pass strict=False")
    return comm.run(lambda: restore_state(ck, view, optimizer, comm.rank, with_opt))
