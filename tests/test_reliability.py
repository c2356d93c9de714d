"""Crash safety and failure propagation of multi-process saves (gloo, real files, SIGKILL)."""
import os
import threading

import pytest

from ucp_plugin.storage import Checkpoint, read_latest
from ucp_plugin.storage.faults import POINTS
from ucp_plugin.testing.launcher import WorkerError, run_workers
from ucp_plugin.tools.verify import verify

W = "core_workers"
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _path(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.mark.parametrize("point", POINTS)
def test_kill_at_any_point_keeps_previous_checkpoint(tmp_path, point):
    root = str(tmp_path)
    run_workers(2, f"{W}:save_tp", {"root": root, "tag": "step1", "step": 1})
    victim = "1" if point in ("before_shard", "after_shard") else "0"
    with pytest.raises(WorkerError, match="exited with code -9"):
        run_workers(2, f"{W}:save_tp", {"root": root, "tag": "step2", "step": 2,
                                        "fault": f"{point}:{victim}"}, timeout=120)
    assert read_latest(root) == "step1"  # `latest` never points at an incomplete checkpoint
    assert verify(os.path.join(root, "step1")) == []
    assert run_workers(3, f"{W}:load_tp", {"root": root}) == [{"step": 1, "equal": True}] * 3
    # killed before the rename: no `step2` at all (only a hidden staging folder); after it, `step2`
    # is complete and committed even though `latest` was not moved yet
    committed = point == "before_latest"
    assert os.path.exists(os.path.join(root, "step2")) == committed
    if committed:
        assert verify(os.path.join(root, "step2")) == []
    # the next save sweeps the killed save's staging folder (its owner process is gone)
    run_workers(2, f"{W}:save_tp", {"root": root, "tag": "step3", "step": 3})
    assert [n for n in os.listdir(root) if ".staging-" in n] == [] and read_latest(root) == "step3"


def test_one_rank_error_raises_everywhere(tmp_path):
    out = run_workers(2, f"{W}:save_with_bad_rank", {"root": str(tmp_path)}, timeout=120)
    assert out[1] == "ValueError: disk full on rank 1"
    assert out[0] == "DistributedError: rank 1: ValueError: disk full on rank 1"
    assert read_latest(str(tmp_path)) is None and not os.path.exists(tmp_path / "bad")


def test_concurrent_saves_and_reads_never_corrupt(tmp_path):
    """Two jobs save into one folder while a reader keeps opening `latest`."""
    root = str(tmp_path)
    run_workers(2, f"{W}:save_tp", {"root": root, "tag": "t0", "step": 0})
    errors, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                ck = Checkpoint.open(root)
                ck.read_atom("w", "fp32")
            except Exception as e:  # any failure here is a corruption the test reports
                errors.append(repr(e))

    t = threading.Thread(target=reader)
    t.start()
    jobs = [threading.Thread(target=run_workers, args=(2, f"{W}:save_tp"),
                             kwargs={"kwargs": {"root": root, "tag": "same", "step": s}}) for s in (3, 4)]
    [j.start() for j in jobs]
    [j.join() for j in jobs]
    stop.set()
    t.join()
    assert errors == []
    assert read_latest(root) == "same" and verify(os.path.join(root, "same")) == []
    assert run_workers(2, f"{W}:load_tp", {"root": root})[0]["equal"]


@pytest.mark.parametrize("fault", ["before_shard:1", "after_shard:0"])
def test_kill_in_background_writer_keeps_previous_checkpoint(tmp_path, fault):
    """Asynchronous save: the writer thread reaches the fault point after save_universal returned."""
    root = str(tmp_path)
    # the first save is still in flight when the workers return: their exit hook commits it
    assert run_workers(2, f"{W}:save_tp", {"root": root, "tag": "step1", "step": 1, "asynchronous": True,
                                           "exit_in_flight": True}) == ["in flight"] * 2
    assert read_latest(root) == "step1"
    with pytest.raises(WorkerError, match="exited with code -9"):
        run_workers(2, f"{W}:save_tp", {"root": root, "tag": "step2", "step": 2, "fault": fault,
                                        "asynchronous": True}, timeout=120)
    assert read_latest(root) == "step1" and not os.path.exists(os.path.join(root, "step2"))
    assert verify(os.path.join(root, "step1")) == []
    assert run_workers(3, f"{W}:load_tp", {"root": root}) == [{"step": 1, "equal": True}] * 3


def test_async_save_protocol(tmp_path):
    root = str(tmp_path)
    out = run_workers(2, f"{W}:async_protocol", {"root": root}, timeout=120)
    for rank in out:
        assert rank["returned_before_commit"] and rank["in_flight"] and rank["poll_while_writing"] is False
        assert rank["refused"].startswith("SaveInProgressError: the asynchronous save ")
        assert rank["a1_committed_by_second_save"] and rank["buffer_reused"]
        assert rank["latest"] == "a2" and rank["in_flight_after_wait"] is None
    for tag, step in (("a1", 1), ("a2", 2)):
        assert verify(os.path.join(root, tag)) == []
        assert run_workers(1, f"{W}:load_tp", {"root": os.path.join(root, tag)}) == [{"step": step, "equal": True}]
