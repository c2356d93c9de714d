"""Universal checkpointing for DeepSpeed: add ``"checkpoint": {"universal": true}`` to the config and
``import ucp_plugin.deepspeed``; ``engine.save_checkpoint`` / ``engine.load_checkpoint`` keep their API.

Importing this package patches DeepSpeed, on purpose (README, ``patches/README.md``: the config key
plus this import is the whole opt-in a DeepSpeed user expects; a forgotten ``enable()`` would silently
save DeepSpeed's own format). It calls ``enable()``, which wraps four engine methods
(``patches/deepspeed_engine_*.py``): ``save_checkpoint`` and ``load_checkpoint``, and
``_do_sanity_check`` and ``_configure_distributed_model`` so that ``deepspeed.initialize`` already
refuses settings the adapter cannot save (``config.check_engine``, before and after the engine wraps
the model). Engines without the config key keep DeepSpeed's behaviour; ``disable()`` removes the
wrappers. ``load_checkpoint`` also reads native DeepSpeed checkpoints (``dsfiles.native``) onto any layout.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from packaging.version import Version

from ..errors import UnsupportedError
from .config import UniversalConfig, check_engine, is_enabled, read_config
from .load import load_checkpoint
from .save import save_checkpoint

__all__ = ["enable", "disable", "is_enabled", "read_config", "UniversalConfig", "save_checkpoint",
           "load_checkpoint"]
_PATCHES = ("deepspeed_engine_save_checkpoint", "deepspeed_engine_load_checkpoint",
            "deepspeed_engine_do_sanity_check", "deepspeed_engine_configure_distributed_model")


def _patch(name: str):
    """The module ``patches/<name>.py``: installed as ``ucp_plugin._patches.<name>`` (setup.py), or, in a
    checkout, importable as ``patches.<name>`` from the repository root or found beside ``ucp_plugin/``."""
    for package in ("ucp_plugin._patches", "patches"):
        try:
            return importlib.import_module(f"{package}.{name}")
        except ImportError:
            pass
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "patches", f"{name}.py")
    if not os.path.isfile(path):
        raise UnsupportedError(f"ucp_plugin.deepspeed needs patches/{name}.py (installed as "
                               f"ucp_plugin._patches.{name}); reinstall ucp_plugin with its setup.py")
    spec = importlib.util.spec_from_file_location(f"_ucp_patches_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def enable() -> None:
    """Install the engine patches (idempotent). Raises UnsupportedError on an untested DeepSpeed."""
    import deepspeed
    from deepspeed.runtime.engine import DeepSpeedEngine

    save_patch, load_patch, check_patch, model_patch = (_patch(n) for n in _PATCHES)
    low, high = save_patch.SUPPORTED
    if not Version(low) <= Version(deepspeed.__version__) < Version(high):
        raise UnsupportedError(f"DeepSpeed {deepspeed.__version__} is outside the versions ucp_plugin "
                               f"patches ([{low}, {high})); install a supported DeepSpeed")
    save_patch.install(DeepSpeedEngine, is_enabled, save_checkpoint)
    load_patch.install(DeepSpeedEngine, is_enabled, load_checkpoint)
    check_patch.install(DeepSpeedEngine, is_enabled, check_engine)
    model_patch.install(DeepSpeedEngine, is_enabled, check_engine)  # again, once the model is wrapped


def disable() -> None:
    """Restore DeepSpeed's own ``save_checkpoint`` / ``load_checkpoint``."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    for name in _PATCHES:
        _patch(name).uninstall(DeepSpeedEngine)


enable()
