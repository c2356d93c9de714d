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
from ucp_plugin.deepspeed.native import safe_load
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


def _fake_engine(**over):
    base = dict(fp16_enabled=lambda: False, zero_offload_optimizer=lambda: None, zero_offload_param=lambda: None,
                zero_optimization_stage=lambda: 2, zero_hpz_partition_size=lambda: 1, mp_world_size=1,
                has_moe_layers=False, _config=types.SimpleNamespace(mics_shard_size=-1))
    return types.SimpleNamespace(**{**base, **over})


def test_check_engine_names_the_unsupported_setting():
    cfg.check_engine(_fake_engine())
    with pytest.raises(UnsupportedError, match="fp16"):
        cfg.check_engine(_fake_engine(fp16_enabled=lambda: True))
    with pytest.raises(UnsupportedError, match="offload"):
        cfg.check_engine(_fake_engine(zero_offload_optimizer=lambda: object()))


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


def test_enable_twice_wraps_once():
    from deepspeed.runtime.engine import DeepSpeedEngine

    enable()
    enable()
    original = DeepSpeedEngine.save_checkpoint.__ucp_original__
    assert not hasattr(original, "__ucp_original__")
    disable()
    assert DeepSpeedEngine.save_checkpoint is original
    enable()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ucp-pwned",))


def test_native_reader_refuses_code_in_pickles(tmp_path):
    path = str(tmp_path / "mp_rank_00_model_states.pt")
    torch.save({"module": {}, "x": _Evil()}, path)
    if os.path.exists("/tmp/ucp-pwned"):
        os.remove("/tmp/ucp-pwned")
    with pytest.raises(FormatError, match="weights-only"):
        safe_load(path)
    assert not os.path.exists("/tmp/ucp-pwned")


def test_open_source_refuses_uncommitted_or_missing(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        open_source(str(tmp_path / "nope"))
    staging = tmp_path / "run" / "global_step3"
    (staging / "shards").mkdir(parents=True)
    with pytest.raises(FormatError, match="not a committed"):
        open_source(str(tmp_path / "run"), tag="global_step3")
