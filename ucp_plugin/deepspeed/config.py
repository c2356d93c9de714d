"""The user-facing switch, ``"checkpoint": {"universal": true}``, and the engine features it supports.

DeepSpeed reads its ``checkpoint`` section as a plain dict and ignores unknown keys
(runtime/config.py:545-553), so our key passes its validation untouched and a misspelling would pass
silently too: ``read_config`` catches near-misses and wrong types, ``check_engine`` refuses engine
features whose state the adapter does not (yet) map, naming the setting to change. ``check_engine``
runs inside ``deepspeed.initialize`` (``patches/deepspeed_engine_do_sanity_check.py``) and again at
save and load.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from ..errors import UnsupportedError
from .params import binding_for

UNIVERSAL = "universal"
ASYNC, ON_BUSY = "async", "async_on_busy"  # ucp_plugin.async_save: background write, commit at a safe point
BUSY_CHOICES = ("wait", "refuse")
DS_UNIVERSAL = "load_universal"  # DeepSpeed's own UCP loader (ds_to_universal folders)
DS_KEYS = ("tag_validation", DS_UNIVERSAL, "use_node_local_storage", "parallel_write",
           "checkpoint_serialization", "writer")


@dataclass(frozen=True)
class UniversalConfig:
    enabled: bool = False
    asynchronous: bool = False
    on_busy: str = "wait"

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise ValueError(f'"checkpoint": {{"{UNIVERSAL}": ...}} must be true or false, not {self.enabled!r}')
        if not isinstance(self.asynchronous, bool):
            raise ValueError(f'"checkpoint": {{"{ASYNC}": {self.asynchronous!r}}} must be true or false')
        if self.on_busy not in BUSY_CHOICES:
            raise ValueError(f'"checkpoint": {{"{ON_BUSY}": {self.on_busy!r}}} must be one of {BUSY_CHOICES} '
                             "(what a save does while the previous asynchronous save is being written)")
        if self.asynchronous and not self.enabled:
            raise ValueError(f'"checkpoint": {{"{ASYNC}": true}} needs "{UNIVERSAL}": true (only universal '
                             "checkpoints are saved asynchronously by ucp_plugin)")


def read_config(param_dict: dict | None) -> UniversalConfig:
    """Our settings from a DeepSpeed config dict (``engine._config._param_dict``)."""
    section = (param_dict or {}).get("checkpoint") or {}
    if not isinstance(section, dict):
        raise ValueError(f'DeepSpeed config "checkpoint" must be an object, not {type(section).__name__}')
    ours = [UNIVERSAL, ASYNC, ON_BUSY]
    for key in section:
        near = difflib.get_close_matches(key, ours, 1, 0.75)
        if key not in ours and key not in DS_KEYS and near:
            raise ValueError(f'DeepSpeed config "checkpoint" has unknown key {key!r}; did you mean '
                             f'"{near[0]}"? (DeepSpeed ignores unknown keys, so the typo would '
                             "silently be ignored)")
    value = section.get(UNIVERSAL, False)
    if not isinstance(value, bool):
        raise ValueError(f'DeepSpeed config "checkpoint": {{"{UNIVERSAL}": {value!r}}} must be true or false')
    if value and section.get(DS_UNIVERSAL):
        raise UnsupportedError(f'"checkpoint" sets both "{UNIVERSAL}" (ucp_plugin) and "{DS_UNIVERSAL}" '
                               "(DeepSpeed's own converter-based UCP); keep only one")
    return UniversalConfig(enabled=value, asynchronous=section.get(ASYNC, False),
                           on_busy=section.get(ON_BUSY, "wait"))


def is_enabled(engine) -> bool:
    return read_config(getattr(engine._config, "_param_dict", None)).enabled


def _device(setting) -> str | None:
    device = getattr(setting, "device", None)
    device = getattr(device, "value", device)
    return None if setting is None or device in (None, "none") else str(device)


def aio_problem() -> str | None:
    """Why NVMe offload cannot run here (DeepSpeed's async-I/O op does not build), or None."""
    try:
        from deepspeed.accelerator import get_accelerator
        builder = get_accelerator().create_op_builder("AsyncIOBuilder")
        if builder is not None and builder.is_compatible(verbose=False):
            return None
    except Exception as e:  # a broken toolchain is a reason too, not a crash of initialize
        return f"DeepSpeed's AsyncIOBuilder failed ({type(e).__name__}: {e})"
    return ("DeepSpeed's async-I/O op (AsyncIOBuilder) is not compatible with this machine (libaio and its "
            "headers are needed: apt install libaio-dev)")


def _offload(setting, name: str) -> str | None:
    """ZeRO-Offload to CPU keeps DeepSpeed's buffers and optimizer state (DeepSpeedCPUAdam) as without
    offload, only on the CPU, so it is supported; NVMe swaps them to files and needs the aio op;
    partial offload ("ratio" < 1) and SuperOffload step some sub-groups in a second optimizer."""
    device = _device(setting)
    if device is None:
        return None
    if device == "nvme":
        problem = aio_problem()
        if problem is not None:
            return (f'"zero_optimization.{name}": {{"device": "nvme"}}: {problem} (use "device": "cpu" '
                    'or "none")')
        return (f'"zero_optimization.{name}": {{"device": "nvme"}} (state swapped to NVMe files is not '
                'mapped yet; use "device": "cpu")')
    if device != "cpu":
        return f'"zero_optimization.{name}": {{"device": "{device}"}} (use "cpu" or "none")'
    if getattr(setting, "ratio", 1.0) < 1.0:
        return f'"zero_optimization.{name}.ratio" < 1 (partial offload; use 1.0)'
    if getattr(setting, "super_offload", False):
        return f'"zero_optimization.{name}.super_offload" (SuperOffload)'
    return None


def _model_parallel_size(engine) -> int:
    if hasattr(engine, "mp_world_size"):
        return engine.mp_world_size
    mpu = getattr(engine, "mpu", None)  # during __init__, before DeepSpeed sets mp_world_size
    return mpu.get_model_parallel_world_size() if mpu is not None else 1


def unsupported_settings(engine) -> list[str]:
    """The engine settings universal checkpointing cannot save exactly. Works from ``__init__``'s
    sanity check on (config parsed, nothing partitioned); MoE is only known once the model is wrapped."""
    stage = engine.zero_optimization_stage()
    problems = [p for p in (_offload(engine.zero_offload_optimizer(), "offload_optimizer"),
                            _offload(engine.zero_offload_param(), "offload_param")) if p]
    if engine.fp16_enabled():
        problems.append('"fp16": {"enabled": true} (use bf16 or fp32)')
    elif stage == 0 and engine.bfloat16_enabled():
        problems.append('"bf16" with ZeRO stage 0 (use "zero_optimization": {"stage": 1} or higher, or fp32)')
    if getattr(engine, "has_moe_layers", False):
        problems.append("MoE layers (expert-parallel groups)")
    if type(engine).__name__ == "PipelineEngine" or getattr(engine, "pipeline_parallelism", False):
        problems.append("pipeline parallelism (PipelineModule)")
    binding = binding_for(engine)
    if binding is not None:
        problems += binding.problems(engine)
    elif _model_parallel_size(engine) > 1:
        problems.append(f"model parallelism (mp size {_model_parallel_size(engine)}) with an mpu ucp_plugin "
                        "cannot map; for a megatron-core model pass "
                        "mpu=ucp_plugin.integrations.megatron_deepspeed.MegatronMPU()")
    if hasattr(engine, "autotp_size") and engine.autotp_size() > 1:
        problems.append(f'"tensor_parallel": {{"autotp_size": {engine.autotp_size()}}} (AutoTP)')
    if stage == 3 and engine.zero_hpz_partition_size() > 1:
        problems.append('"zero_optimization.zero_hpz_partition_size" > 1 (ZeRO++ hpZ)')
    if getattr(engine._config, "mics_shard_size", -1) > 0:
        problems.append('"zero_optimization.mics_shard_size" (MiCS)')
    return problems


def check_engine(engine) -> None:
    """Raise UnsupportedError naming every engine setting the adapter cannot save or restore exactly.
    Called by ``deepspeed.initialize`` (patched ``_do_sanity_check``) and again at save and load."""
    problems = unsupported_settings(engine)
    if problems:
        raise UnsupportedError('"checkpoint": {"universal": true} does not support ' + "; ".join(problems)
                               + '; change these settings or remove "universal" from "checkpoint"')
