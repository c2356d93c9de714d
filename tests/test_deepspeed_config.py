"""ucp_plugin.deepspeed without processes: the config switch, the engine patches, refusing unsafe or
incomplete checkpoints."""
from __future__ import annotations

import os
import types

import pytest
import torch

from ucp_plugin.errors import FormatError, UnsupportedError
from ucp_plugin.deepspeed import config as cfg
from ucp_plugin.deepspeed import disable, enable
from ucp_plugin.dsfiles.native import safe_load
from ucp_plugin.deepspeed.sources import open_source


def test_read_config_switch_and_mistakes():
    assert not cfg.read_config({}).enabled
    assert not cfg.read_config({"checkpoint": {"tag_validation": "Warn"}}).enabled
    assert cfg.read_config({"checkpoint": {"universal": True}}).enabled
    with pytest.raises(ValueError, match="true or false"):
        cfg.read_config({"checkpoint": {"universal": "yes"}})
    with pytest.raises(ValueError, match='did you mean "universal"'):
        cfg.read_config({"checkpoint": {"univresal": True}})
    with pytest.raises(UnsupportedError, match="load_universal"):
        cfg.read_config({"checkpoint": {"universal": True, "load_universal": True}})


def test_read_config_async():
    on = cfg.read_config({"checkpoint": {"universal": True, "async": True}})
    assert on.asynchronous and on.on_busy == "wait" and not cfg.read_config({}).asynchronous
    assert cfg.read_config({"checkpoint": {"universal": True, "async": True,
                                           "async_on_busy": "refuse"}}).on_busy == "refuse"
    for section, message in (({"universal": True, "async": "yes"}, '"async": \'yes\'.* true or false'),
                             ({"universal": True, "async": True, "async_on_busy": "skip"}, "one of"),
                             ({"async": True}, 'needs "universal": true'),
                             ({"universal": True, "asnyc": True}, 'did you mean "async"'),
                             ({"universal": True, "async_on_bsy": "wait"}, 'did you mean "async_on_busy"')):
        with pytest.raises(ValueError, match=message):
            cfg.read_config({"checkpoint": section})


def _fake_engine(**over):
    base = dict(fp16_enabled=lambda: False, bfloat16_enabled=lambda: False, zero_offload_optimizer=lambda: None,
                zero_offload_param=lambda: None, zero_optimization_stage=lambda: 2,
                zero_hpz_partition_size=lambda: 1, autotp_size=lambda: 1, mp_world_size=1,
                has_moe_layers=False, _config=types.SimpleNamespace(mics_shard_size=-1))
    return types.SimpleNamespace(**{**base, **over})


def test_check_engine_names_the_unsupported_setting():
    from deepspeed.runtime.zero.offload_config import (DeepSpeedZeroOffloadOptimizerConfig,
                                                       DeepSpeedZeroOffloadParamConfig)

    cfg.check_engine(_fake_engine())
    cfg.check_engine(_fake_engine(zero_offload_optimizer=lambda: DeepSpeedZeroOffloadOptimizerConfig(device="none")))
    cfg.check_engine(_fake_engine(zero_offload_optimizer=lambda: DeepSpeedZeroOffloadOptimizerConfig(device="cpu"),
                                  zero_offload_param=lambda: DeepSpeedZeroOffloadParamConfig(device="cpu")))
    cases = [
        (dict(fp16_enabled=lambda: True), '"fp16": {"enabled": true}'),
        (dict(bfloat16_enabled=lambda: True, zero_optimization_stage=lambda: 0), '"bf16" with ZeRO stage 0'),
        (dict(zero_offload_optimizer=lambda: DeepSpeedZeroOffloadOptimizerConfig(device="cpu", ratio=0.5)),
         '"zero_optimization.offload_optimizer.ratio" < 1'),
        (dict(zero_offload_optimizer=lambda: DeepSpeedZeroOffloadOptimizerConfig(device="nvme", nvme_path="/x")),
         '"zero_optimization.offload_optimizer": {"device": "nvme"}: ' if cfg.aio_problem() else
         '"zero_optimization.offload_optimizer": {"device": "nvme"} (state swapped'),
        (dict(zero_offload_param=lambda: DeepSpeedZeroOffloadParamConfig(device="nvme", nvme_path="/x")),
         '"zero_optimization.offload_param": {"device": "nvme"}'),
        (dict(mp_world_size=2), "model parallelism (mp size 2)"),
        (dict(autotp_size=lambda: 2), '"autotp_size": 2'),
        (dict(has_moe_layers=True), "MoE"),
        (dict(zero_optimization_stage=lambda: 3, zero_hpz_partition_size=lambda: 2), "hpZ"),
        (dict(_config=types.SimpleNamespace(mics_shard_size=2)), "MiCS"),
    ]
    for over, text in cases:
        with pytest.raises(UnsupportedError, match="does not support") as info:
            cfg.check_engine(_fake_engine(**over))
        assert text in str(info.value) and 'remove "universal"' in str(info.value), (text, str(info.value))
    early = _fake_engine(pipeline_parallelism=True, mpu=types.SimpleNamespace(get_model_parallel_world_size=lambda: 4))
    del early.mp_world_size  # as inside DeepSpeedEngine.__init__, before _configure_distributed_model
    problems = cfg.unsupported_settings(early)
    assert problems[0] == "pipeline parallelism (PipelineModule)"
    assert problems[1].startswith("model parallelism (mp size 4) with an mpu ucp_plugin cannot map") \
        and "MegatronMPU()" in problems[1]


def test_patches_are_idempotent_and_route_on_the_flag():
    from patches import deepspeed_engine_load_checkpoint as load_patch
    from patches import deepspeed_engine_save_checkpoint as save_patch

    class Engine:
        def save_checkpoint(self, save_dir, tag=None, client_state={}, save_latest=True,
                            exclude_frozen_parameters=False):
            return ("native", save_dir, tag)

        def load_checkpoint(self, load_dir, tag=None, **kw):
            return ("native", load_dir)

    def enabled(e):
        return e.on

    assert save_patch.install(Engine, enabled, lambda e, d, **kw: ("ucp", d, kw["tag"]))
    assert not save_patch.install(Engine, enabled, lambda e, d, **kw: "twice")
    assert load_patch.install(Engine, enabled, lambda e, d, **kw: ("ucp", d))
    e = Engine()
    e.on = False
    assert e.save_checkpoint("d", tag="t") == ("native", "d", "t") and e.load_checkpoint("d") == ("native", "d")
    e.on = True
    assert e.save_checkpoint("d", tag="t") == ("ucp", "d", "t") and e.load_checkpoint("d") == ("ucp", "d")
    assert save_patch.uninstall(Engine) and load_patch.uninstall(Engine)
    assert e.save_checkpoint("d", tag="t") == ("native", "d", "t")
    assert not save_patch.uninstall(Engine)


def test_sanity_check_patch_runs_the_check_first_only_when_enabled():
    from patches import deepspeed_engine_do_sanity_check as check_patch

    calls = []

    class Engine:
        def _do_sanity_check(self):
            calls.append("deepspeed")

    def check(e):
        calls.append("ucp")
        if e.bad:
            raise UnsupportedError("bad setting")

    assert check_patch.install(Engine, lambda e: e.on, check)
    assert not check_patch.install(Engine, lambda e: e.on, check)
    e = Engine()
    e.on, e.bad = False, True
    e._do_sanity_check()
    e.on, e.bad = True, False
    e._do_sanity_check()
    assert calls == ["deepspeed", "ucp", "deepspeed"]
    e.bad = True
    with pytest.raises(UnsupportedError, match="bad setting"):
        e._do_sanity_check()
    assert check_patch.uninstall(Engine) and not check_patch.uninstall(Engine)
    e._do_sanity_check()
    assert calls[-1] == "deepspeed" and calls.count("ucp") == 2


def test_model_patch_checks_after_deepspeed_wrapped_the_model():
    from patches import deepspeed_engine_configure_distributed_model as model_patch

    calls = []

    class Engine:
        def _configure_distributed_model(self, model):
            calls.append("deepspeed")
            self.module = model

    def check(e):
        calls.append(("ucp", e.module))
        if e.module == "bad":
            raise UnsupportedError("bad model")

    assert model_patch.install(Engine, lambda e: e.on, check)
    assert not model_patch.install(Engine, lambda e: e.on, check)
    e = Engine()
    e.on = False
    e._configure_distributed_model("bad")
    e.on = True
    e._configure_distributed_model("good")
    assert calls == ["deepspeed", "deepspeed", ("ucp", "good")]
    with pytest.raises(UnsupportedError, match="bad model"):
        e._configure_distributed_model("bad")
    assert model_patch.uninstall(Engine) and not model_patch.uninstall(Engine)


def test_enable_twice_wraps_once():
    from deepspeed.runtime.engine import DeepSpeedEngine

    enable()
    enable()
    methods = ("save_checkpoint", "load_checkpoint", "_do_sanity_check", "_configure_distributed_model")
    originals = {m: getattr(DeepSpeedEngine, m).__ucp_original__ for m in methods}
    assert not any(hasattr(o, "__ucp_original__") for o in originals.values())
    disable()
    assert all(getattr(DeepSpeedEngine, m) is o for m, o in originals.items())
    enable()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ucp-pwned",))


def test_native_reader_refuses_code_in_pickles(tmp_path):
    path = str(tmp_path / "mp_rank_00_model_states.pt")
    torch.save({"module": {}, "x": _Evil()}, path)
    if os.path.exists("/tmp/ucp-pwned"):
        os.remove("/tmp/ucp-pwned")
    with pytest.raises(FormatError, match=r"refused or unreadable \(global posix\.system is not allowed\)"):
        safe_load(path)
    assert not os.path.exists("/tmp/ucp-pwned")


def test_open_source_refuses_uncommitted_or_missing(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        open_source(str(tmp_path / "nope"))
    staging = tmp_path / "run" / "global_step3"
    (staging / "shards").mkdir(parents=True)
    with pytest.raises(FormatError, match="not a committed"):
        open_source(str(tmp_path / "run"), tag="global_step3")


def _native_stage0(folder, state: dict):
    """A minimal stage-0 DeepSpeed checkpoint: model states with the torch optimizer's state dict."""
    module = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(4), "buf": torch.zeros(())}
    os.makedirs(folder, exist_ok=True)
    torch.save({"module": module, "buffer_names": ["buf"], "param_shapes": None, "dp_world_size": 1,
                "mp_world_size": 1, "ds_config": {"zero_optimization": {"stage": 0}}, "global_steps": 2,
                "optimizer": {"state": state, "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0, 1]}]}},
               os.path.join(folder, "mp_rank_00_model_states.pt"))


def test_native_stage0_states_are_named_by_the_optimizer(tmp_path):
    from ucp_plugin.dsfiles.native import NativeSource

    _native_stage0(tmp_path / "ok", {0: {"momentum_buffer": torch.full((2, 3), 2.0)},
                                     1: {"momentum_buffer": torch.full((4,), 3.0)}})
    src = NativeSource(str(tmp_path / "ok"))
    assert src.atoms["a"].states == {"fp32": "float32", "momentum_buffer": "float32"}
    assert src.atoms["a"].scalars == {} and src.atoms["buf"].kind == "buffer"
    assert torch.equal(src.read("b", "momentum_buffer", 1, 3, torch.float32), torch.full((2,), 3.0))
    assert torch.equal(src.read("a", "fp32", 2, 5, torch.float32), torch.tensor([2.0, 3.0, 4.0]))
    _native_stage0(tmp_path / "swapped", {0: {"momentum_buffer": torch.ones(4)},
                                          1: {"momentum_buffer": torch.ones(2, 3)}})
    with pytest.raises(UnsupportedError, match="model order"):
        NativeSource(str(tmp_path / "swapped"))
