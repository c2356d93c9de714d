"""What ``storage.stale.sweep`` removes from a save folder, and what it must keep."""
import os
import socket
import subprocess
import sys

from ucp_plugin.storage.stale import stale_folders, sweep


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sweep_removes_dead_and_old_leftovers_only(tmp_path):
    host = socket.gethostname()
    names = {"dead": f".s1.staging-0a1b2c3d-{_dead_pid()}@{host}",
             "live": f".s2.staging-0a1b2c3d-{os.getpid()}@{host}",
             "other_host": f".s3.staging-0a1b2c3d-1@elsewhere-{host}",
             "legacy": ".s4.staging-0a1b2c3d",
             "replaced": "s5.old-0a1b2c3d", "only_copy": "s6.old-0a1b2c3d", "s5": "s5"}
    for name in names.values():
        os.makedirs(tmp_path / name / "shards")
    assert sorted(map(os.path.basename, stale_folders(str(tmp_path)))) == sorted(
        [names["dead"], names["replaced"]])
    # a folder nobody touched for longer than the limit goes too, whoever owns it
    old = sorted(map(os.path.basename, stale_folders(str(tmp_path), max_age=-1)))
    assert old == sorted([names[k] for k in ("dead", "live", "other_host", "legacy", "replaced")])
    # this save's own staging folder is never a leftover
    assert str(tmp_path / names["dead"]) not in stale_folders(str(tmp_path), str(tmp_path / names["dead"]))
    sweep(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(
        [names[k] for k in ("live", "other_host", "legacy", "only_copy", "s5")])
