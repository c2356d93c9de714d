"""A local multi-process launcher for CPU/gloo runs (tests and recipes), torchrun-like.

``run_workers(4, "pkg.module:function", {"k": v})`` starts four Python processes with the usual
``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` variables, calls ``function(**kwargs)`` in each,
and returns the per-rank return values (which must be JSON-serialisable). Any rank's failure is
raised in the caller with that rank's stderr tail, and the other ranks are killed, so one bad rank
never leaves the caller waiting on a collective.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from ..errors import UCPError


class WorkerError(UCPError):
    """A worker process failed; the message carries its stderr tail."""


@dataclass(frozen=True)
class WorkerResult:
    rank: int
    value: object


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env(rank: int, world_size: int, port: int, extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
               LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               DS_ACCELERATOR="cpu", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    if extra:
        env.update(extra)
    return env


def _tail(path: str, lines: int = 40) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def run_workers(world_size: int, target: str, kwargs: dict | None = None, *, timeout: float = 600,
                env: dict[str, str] | None = None, log_dir: str | None = None) -> list[object]:
    """Run ``target`` ("module:function") on ``world_size`` ranks; return the values by rank."""
    log_dir = log_dir or tempfile.mkdtemp(prefix="ucp-launch-")
    os.makedirs(log_dir, exist_ok=True)
    port = free_port()
    spec = json.dumps({"target": target, "kwargs": kwargs or {}})
    procs = []
    for rank in range(world_size):
        out = os.path.join(log_dir, f"rank{rank}.json")
        err = open(os.path.join(log_dir, f"rank{rank}.log"), "w")
        cmd = [sys.executable, "-m", "ucp_plugin.testing.launcher", spec, out]
        procs.append((subprocess.Popen(cmd, env=_worker_env(rank, world_size, port, env),
                                       stdout=err, stderr=subprocess.STDOUT), err, out))
    _wait_all(procs, timeout, log_dir)
    values = []
    for _, _, out in procs:
        with open(out) as f:
            values.append(json.load(f)["value"])
    return values


def _wait_all(procs, timeout: float, log_dir: str) -> None:
    deadline = time.monotonic() + timeout
    try:
        while True:
            codes = [p.poll() for p, _, _ in procs]
            bad = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                rank = bad[0]
                raise WorkerError(f"rank {rank} exited with code {codes[rank]}; log "
                                  f"{log_dir}/rank{rank}.log:\n{_tail(f'{log_dir}/rank{rank}.log')}")
            if all(c == 0 for c in codes):
                return
            if time.monotonic() > deadline:
                raise WorkerError(f"workers timed out after {timeout:.0f}s; logs in {log_dir}:\n"
                                  f"{_tail(f'{log_dir}/rank0.log')}")
            time.sleep(0.05)
    finally:
        for p, err, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            err.close()


def _main(spec_json: str, out_path: str) -> None:
    import importlib

    from . import nccl_rule

    nccl_rule.install_from_env()  # tests run the plugin's collectives under NCCL's device rule
    spec = json.loads(spec_json)
    module, func = spec["target"].split(":")
    value = getattr(importlib.import_module(module), func)(**spec["kwargs"])
    with open(out_path + ".tmp", "w") as f:
        json.dump({"value": value}, f)
    os.replace(out_path + ".tmp", out_path)
    _exit_after_atexit()


def _exit_after_atexit() -> None:
    """Run the atexit hooks (an asynchronous save in flight is committed there), then leave without
    C++ static destruction: a process group never destroyed by the worker (DeepSpeed, Trainer) can
    abort there ("terminate called without an active exception", code -6) after a good run."""
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
