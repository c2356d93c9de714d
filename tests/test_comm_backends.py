"""The plugin's collectives under NCCL's device rule, and save-path errors agreed on every rank.

``UCP_EMULATE_NCCL=1`` (``ucp_plugin.testing.nccl_rule``) makes a plugin collective on the default
group given a CPU tensor raise as NCCL does; the DeepSpeed and Megatron transition campaigns run
under it too. Here: the rule catches the calls comm.py made before its gloo side group, and lets the
side group, the frameworks' and the tests' own collectives through.
"""
import errno
import os
import subprocess

import pytest

from ucp_plugin.testing.launcher import run_workers
from ucp_plugin.testing import nccl_rule

pytestmark = pytest.mark.slow
W = "comm_workers"


@pytest.fixture(autouse=True)
def _path(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def test_product_modules_are_told_from_scaffolding():
    assert nccl_rule.is_product("ucp_plugin.comm") and nccl_rule.is_product("ucp_plugin.megatron.checkpoint")
    assert not nccl_rule.is_product("ucp_plugin.testing.nccl_rule")
    assert not nccl_rule.is_product("deepspeed.comm.torch") and not nccl_rule.is_product("ucp_plugin_x")


def test_collectives_under_the_nccl_rule():
    out = run_workers(2, f"{W}:collectives", env={nccl_rule.ENV: "1"}, timeout=120)
    for rank, r in enumerate(out):
        assert r["wire_is_default"] is False  # the gloo side group
        assert (r["sum"], r["text"], r["own"]) == (3, "from rank 1", None)
        assert r["agreed"] == ("ZeroDivisionError: division by zero" if rank == 1 else
                               "DistributedError: rank 1: ZeroDivisionError: division by zero")
        assert nccl_rule.NCCL_ERROR in r["old_comm"] and "ucp_plugin.comm.all_reduce" in r["old_comm"]


def _read_only_mount(path) -> bool:
    """A read-only tmpfs at ``path`` where this process may mount (root with CAP_SYS_ADMIN)."""
    os.makedirs(path)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_unusable_save_paths_fail_on_every_rank(tmp_path):
    """An unusable save folder gives every rank one error naming it (no hang, no lone rank-0
    failure); a full disk when creating the folder (rank 0) or writing a shard (rank 1), injected."""
    (tmp_path / "file").write_text("not a folder")
    cases = {"under_a_file": [str(tmp_path / "file" / "ckpt"), None],
             "full_at_mkdir": [str(tmp_path / "a"), "staging:0:ENOSPC"],
             "full_at_write": [str(tmp_path / "b"), "before_shard:1:ENOSPC"]}
    ro = tmp_path / "ro"
    mounted = _read_only_mount(ro)
    if mounted:
        cases["read_only"] = [str(ro / "ckpt"), None]
    try:
        out = run_workers(2, f"{W}:bad_save_paths", {"cases": cases}, timeout=120)
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)], check=True)
    strerror = {"under_a_file": os.strerror(errno.ENOTDIR), "full_at_mkdir": os.strerror(errno.ENOSPC),
                "full_at_write": os.strerror(errno.ENOSPC), "read_only": os.strerror(errno.EROFS)}
    for case, (root, _) in cases.items():
        errors = [r[case]["error"] for r in out]
        print(case, errors, [f"{r[case]['seconds']:.2f} s" for r in out])
        assert all(e is not None and strerror[case] in e for e in errors), (case, errors)
        if case != "full_at_write":
            assert all(f"cannot create the save folder {root!r}" in e for e in errors), (case, errors)
    assert out[1]["full_at_mkdir"]["error"].startswith("DistributedError: rank 0: OSError")
    assert out[0]["full_at_write"]["error"].startswith("DistributedError: rank 1: OSError")
    assert not os.path.exists(tmp_path / "a" / "t") and not os.path.exists(tmp_path / "b" / "t")
