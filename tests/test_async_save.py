"""Asynchronous save, in one process: the writer writes the staging arena's views without copying
them again, and its thread runs at a lower priority than the training."""
import os
import sys
import threading

import pytest
import torch

from ucp_plugin import async_save
from ucp_plugin.format import Atom, Region, dtype_name
from ucp_plugin.language import Replicated
from ucp_plugin.storage.snapshot import Snapshot, StagingArena
from ucp_plugin.storage.writer import ShardWriter, prepare_staging

SHAPE = (8, 6)


def _fill(writer, states: dict) -> None:
    writer.add_atom(Atom("w", "param", SHAPE, Replicated().to_json(),
                         {k: dtype_name(v.dtype) for k, v in states.items()}, {}))
    for key, t in states.items():
        writer.add("w", key, t, Region.whole(SHAPE), 0)


def _shard(staging: str) -> bytes:
    with open(os.path.join(staging, "shards", "rank-00000.safetensors"), "rb") as f:
        return f.read()


def test_writer_holds_the_arena_views_and_writes_what_sync_writes(tmp_path):
    g = torch.Generator().manual_seed(0)
    states = {"fp32": torch.randn(SHAPE, generator=g),
              "exp_avg": torch.randn(SHAPE[::-1], generator=g).t(),  # not contiguous: copied once
              "bf16": torch.randn(SHAPE, generator=g).to(torch.bfloat16)}
    sync = ShardWriter(prepare_staging(str(tmp_path), "sync"), 0)
    _fill(sync, states)
    held = sync._tensors
    assert held["w/fp32/0"].data_ptr() == states["fp32"].data_ptr()  # by reference
    assert held["w/exp_avg/0"].is_contiguous() and torch.equal(held["w/exp_avg/0"], states["exp_avg"].reshape(-1))
    sync.finish()

    snapshot, arena = Snapshot(0), StagingArena(pin=False)
    _fill(snapshot, states)
    snapshot.copy_into(arena)
    for t in states.values():  # the training moves on: the snapshot must not see it
        t.add_(1)
    background = ShardWriter(prepare_staging(str(tmp_path), "async"), 0)
    snapshot.replay(background)
    lo, hi = arena.buffer.data_ptr(), arena.buffer.data_ptr() + arena.buffer.numel()
    assert all(lo <= t.data_ptr() < hi for t in background._tensors.values()), "writer copied the arena views"
    background.finish()
    assert _shard(background.staging) == _shard(sync.staging)


def _may_raise_nice() -> bool:
    ok = []

    def probe():
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + 1)
            ok.append(True)
        except OSError:
            pass
    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return bool(ok)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_writer_thread_runs_at_writer_nice():
    if os.getpriority(os.PRIO_PROCESS, 0) >= async_save.WRITER_NICE:
        pytest.skip("this process already runs at or above the writer's nice value")
    if not _may_raise_nice():
        pytest.skip("setpriority on a thread is not permitted here")
    seen = []
    p = async_save.PendingSave(None, "t", lambda: seen.append(os.getpriority(os.PRIO_PROCESS,
                                                                             threading.get_native_id())),
                               lambda: None)
    p.thread.start()
    p.thread.join()
    p.raise_error()
    assert seen == [async_save.WRITER_NICE]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < async_save.WRITER_NICE  # not the caller's
