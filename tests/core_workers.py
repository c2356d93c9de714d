"""Worker functions for multi-process tests of the core (plain torch.distributed over gloo)."""
import os

import torch
import torch.distributed as dist

from ucp_plugin.comm import Comm
from ucp_plugin.format import Atom, Layout
from ucp_plugin.language import Partitioned
from ucp_plugin.plan import local_numel, region_for
from ucp_plugin.session import SaveHeader, save_universal
from ucp_plugin.storage import Checkpoint

SHAPE = (8, 6)


def _atom(step):
    return torch.arange(48.0).reshape(SHAPE) + 1000 * step


def save_tp(root, tag, step, fault=None):
    """Each rank writes its TP shard of one parameter; optionally dies at an injected point."""
    if fault:
        os.environ["UCP_FAULT"] = fault
    dist.init_process_group("gloo")
    comm = Comm()
    tp, rank = comm.world_size, comm.rank
    split = Partitioned(1)
    region = region_for(split, SHAPE, rank, tp)

    def fill(w):
        w.add_atom(Atom("w", "param", SHAPE, split.to_json(), {"fp32": "float32"}, {"step": step}))
        local = _atom(step)[:, rank * 6 // tp:(rank + 1) * 6 // tp]
        w.add("w", "fp32", local, region, 0)
        w.save_state({"step": step, "rank": rank})

    save_universal(comm, root, tag, SaveHeader("core-test", "1", "torch", torch.__version__,
                                               Layout(tp=tp), iteration=step), fill)
    dist.destroy_process_group()
    return "saved"


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
