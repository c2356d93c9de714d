"""Worker functions for multi-process tests of the core (plain torch.distributed over gloo)."""
import os
import threading

import torch
import torch.distributed as dist

import ucp_plugin
from ucp_plugin.comm import Comm
from ucp_plugin.format import Atom, Layout
from ucp_plugin.language import Partitioned
from ucp_plugin.plan import local_numel, region_for
from ucp_plugin.session import SaveHeader, save_universal
from ucp_plugin.storage import Checkpoint, ShardWriter, read_latest

SHAPE = (8, 6)


def _atom(step):
    return torch.arange(48.0).reshape(SHAPE) + 1000 * step


def _tp_fill(comm, step, local=None):
    tp, rank = comm.world_size, comm.rank
    split = Partitioned(1)
    region = region_for(split, SHAPE, rank, tp)
    local = _atom(step)[:, rank * 6 // tp:(rank + 1) * 6 // tp] if local is None else local

    def fill(w):
        w.add_atom(Atom("w", "param", SHAPE, split.to_json(), {"fp32": "float32"}, {"step": step}))
        w.add("w", "fp32", local, region, 0)
        w.save_state({"step": step, "rank": rank, "t": torch.full((2,), float(step))})

    return fill


def _header(comm, step):
    return SaveHeader("core-test", "1", "torch", torch.__version__, Layout(tp=comm.world_size), iteration=step)


def save_tp(root, tag, step, fault=None, asynchronous=False, exit_in_flight=False):
    """Each rank writes its TP shard of one parameter; optionally dies at an injected point. With
    ``asynchronous`` the shard is written by the background writer, which starts only once
    ``save_universal`` has returned (so an injected writer fault fires there), then ``wait``; with
    ``exit_in_flight`` the worker returns with the save in flight and the process group up, so the
    exit hook must finish and commit it."""
    if fault:
        os.environ["UCP_FAULT"] = fault
    dist.init_process_group("gloo")
    comm = Comm()
    gate = _gate_writer() if asynchronous else None
    save_universal(comm, root, tag, _header(comm, step), _tp_fill(comm, step), asynchronous=asynchronous)
    if gate:
        gate.set()
        if exit_in_flight:
            return "in flight"
        ucp_plugin.wait()
    dist.destroy_process_group()
    return "saved"


def _gate_writer() -> threading.Event:
    """Make every ShardWriter.finish wait for the returned event: the test controls when the
    background write proceeds."""
    gate, finish = threading.Event(), ShardWriter.finish

    def gated(self):
        gate.wait()
        finish(self)

    ShardWriter.finish = gated
    return gate


def async_protocol(root):
    """Asynchronous saves on 2 ranks: the call returns before the shard is written; what is saved is
    the state at the call even if training changes it afterwards; a second save while the first is in
    flight is refused (on_busy="refuse") on every rank or waits for it ("wait"); the staging buffer is
    allocated once and reused; ``wait`` commits."""
    from ucp_plugin import async_save

    dist.init_process_group("gloo")
    comm, out = Comm(), {}
    gate = _gate_writer()
    live = _atom(1)[:, comm.rank * 6 // comm.world_size:(comm.rank + 1) * 6 // comm.world_size].clone()
    save_universal(comm, root, "a1", _header(comm, 1), _tp_fill(comm, 1, live), asynchronous=True)
    ptr = async_save.arena().buffer.data_ptr()
    out["returned_before_commit"] = read_latest(root) is None and not os.path.exists(os.path.join(root, "a1"))
    out["in_flight"] = async_save.in_flight() == os.path.join(root, "a1")
    out["poll_while_writing"] = ucp_plugin.poll()
    live.add_(5000.0)  # the training moves on: the checkpoint must hold the values at the call
    try:
        save_universal(comm, root, "a2", _header(comm, 2), _tp_fill(comm, 2), asynchronous=True,
                       on_busy="refuse")
        out["refused"] = None
    except Exception as e:
        out["refused"] = f"{type(e).__name__}: {e}"
    gate.set()
    save_universal(comm, root, "a2", _header(comm, 2), _tp_fill(comm, 2), asynchronous=True)  # waits for a1
    out["a1_committed_by_second_save"] = os.path.exists(os.path.join(root, "a1"))
    out["buffer_reused"] = async_save.arena().buffer.data_ptr() == ptr and async_save.arena().allocations == 1
    ucp_plugin.wait()
    out["latest"], out["in_flight_after_wait"] = read_latest(root), async_save.in_flight()
    dist.destroy_process_group()
    return out


def load_tp(root):
    """Every rank of another TP size reads its shard; returns whether it equals the saved atom."""
    dist.init_process_group("gloo")
    comm = Comm()
    ck = Checkpoint.open(root)
    region = region_for(Partitioned(1), SHAPE, comm.rank, comm.world_size)
    got = ck.read_fragment("w", "fp32", region, 0, local_numel(region, SHAPE))
    step = ck.manifest.iteration
    want = _atom(step)[:, comm.rank * 6 // comm.world_size:(comm.rank + 1) * 6 // comm.world_size]
    dist.destroy_process_group()
    return {"step": step, "equal": bool(torch.equal(got, want.reshape(-1)))}


def save_with_bad_rank(root):
    """Rank 1 fails inside its fill; every rank must raise, nobody may hang, nothing commits."""
    dist.init_process_group("gloo")
    comm = Comm()

    def fill(w):
        if comm.rank == 1:
            raise ValueError("disk full on rank 1")

    try:
        save_universal(comm, root, "bad", SaveHeader("core-test", "1", "torch", "", Layout(dp=2)), fill)
        return "no error"
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    finally:
        dist.destroy_process_group()
