"""NCCL's device rule, emulated on gloo for the plugin's own collectives (test scaffolding).

On a GPU job the default process group is NCCL, which refuses CPU tensors ("No backend type
associated with device type cpu"). Tests run on gloo, which takes them, so a plugin collective that
would break every GPU job passes on CPU. ``install()`` (in a worker process, before the target runs;
the launcher calls it when ``UCP_EMULATE_NCCL=1``) restores the rule where it matters:

- a torch.distributed collective called *directly from a product module* of ``ucp_plugin`` on the
  default group with a CPU tensor raises NCCL's error. DeepSpeed's, megatron's and the test
  scaffolding's own collectives (which on a GPU job carry device tensors, and here legitimately carry
  CPU ones over the CPU accelerator's gloo) are left alone: the caller's module decides;
- ``ucp_plugin.comm.takes_cpu`` answers for the default group as it would for NCCL, so ``Comm`` takes
  the path a GPU job takes (its gloo side group).
"""
from __future__ import annotations

import functools
import os
import sys

import torch

ENV = "UCP_EMULATE_NCCL"
NCCL_ERROR = "No backend type associated with device type cpu"
# point-to-point ops are left unwrapped: torch's P2POp (megatron's pipeline schedule) checks
# ``op in (dist.isend, dist.irecv)`` by identity, and the plugin sends nothing point to point
COLLECTIVES = ("broadcast", "all_reduce", "reduce", "all_gather", "all_gather_into_tensor", "gather", "scatter",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single")
# the scaffolding (harnesses, CPU shim, launcher) stands in for the frameworks: not product code
SCAFFOLDING = ("ucp_plugin.testing",)
_installed = False


def is_product(module: str) -> bool:
    return (module == "ucp_plugin" or module.startswith("ucp_plugin.")) and not module.startswith(SCAFFOLDING)


def _cpu_tensors(values) -> bool:
    for v in values:
        if isinstance(v, torch.Tensor) and v.device.type == "cpu":
            return True
        if isinstance(v, (list, tuple)) and _cpu_tensors(v):
            return True
    return False


def _on_default(group) -> bool:
    import torch.distributed as dist

    return group is None or group is dist.group.WORLD or group is dist.distributed_c10d._get_default_group()


def _guard(fn):
    @functools.wraps(fn)
    def collective(*args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if is_product(caller) and _on_default(kwargs.get("group")) and _cpu_tensors([*args, *kwargs.values()]):
            raise RuntimeError(f"{NCCL_ERROR} (NCCL rule emulated for {caller}.{fn.__name__}, {ENV}=1)")
        return fn(*args, **kwargs)

    collective.__wrapped_by_nccl_rule__ = True
    return collective


def install() -> None:
    """Idempotent; process-global (call it only in worker processes)."""
    global _installed
    if _installed:
        return
    import torch.distributed as dist

    from ucp_plugin import comm

    for name in COLLECTIVES:
        setattr(dist, name, _guard(getattr(dist, name)))
    real = getattr(comm, "takes_cpu", None)  # absent from a comm.py that knows no backend rule
    if real is not None:
        comm.takes_cpu = lambda group: False if _on_default(group) else real(group)
    _installed = True


def install_from_env() -> None:
    if os.environ.get(ENV) == "1":
        install()
