"""Worker functions for tests/test_comm_backends.py (run by ``ucp_plugin.testing.launcher``; the NCCL rule
emulation is installed by the launcher when ``UCP_EMULATE_NCCL=1``)."""
import os
import time

import torch
import torch.distributed as dist

from ucp_plugin.comm import Comm
from ucp_plugin.format import Layout
from ucp_plugin.session import SaveHeader, save_universal


def _error(fn) -> str | None:
    try:
        fn()
        return None
    except Exception as e:  # reported to the test, which asserts on it
        return f"{type(e).__name__}: {e}"


def collectives() -> dict:
    """The plugin's collectives on every path, under the NCCL rule."""
    dist.init_process_group("gloo")
    comm = Comm()
    rank = comm.rank
    out = {"wire_is_default": comm.wire is None or comm.wire is dist.group.WORLD,
           "sum": comm.all_sum(rank + 1), "text": comm.broadcast_str("from rank 1" if rank == 1 else "", src=1),
           "agreed": _error(lambda: comm.run(lambda: 1 / (rank - 1))),
           # a test module's own CPU collective on the default group (as DeepSpeed's on its CPU
           # accelerator): not the plugin's, so allowed
           "own": _error(lambda: dist.all_reduce(torch.ones(1)))}
    comm.barrier()
    # what comm.py did before the side group: the same calls on the default group
    comm.wire = None
    out["old_comm"] = _error(lambda: comm.all_sum(1))
    dist.destroy_process_group()
    return out


def _save(root: str, fault: str | None = None) -> dict:
    os.environ.pop("UCP_FAULT", None)
    if fault:
        os.environ["UCP_FAULT"] = fault
    start = time.perf_counter()
    error = _error(lambda: save_universal(Comm(), root, "t", SaveHeader("comm-test", "1", "torch", "", Layout(dp=2)),
                                          lambda w: w.save_state({"x": 1})))
    os.environ.pop("UCP_FAULT", None)
    return {"error": error, "seconds": time.perf_counter() - start}


def bad_save_paths(cases: dict) -> dict:
    """{case: {"error", "seconds"}} of saves to unusable paths ({case: [root, fault or None]})."""
    dist.init_process_group("gloo")
    out = {case: _save(root, fault) for case, (root, fault) in cases.items()}
    dist.destroy_process_group()
    return out
