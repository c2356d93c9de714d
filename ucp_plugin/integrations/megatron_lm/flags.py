"""Megatron-LM launch flags for universal checkpoints, and the frozen options the library receives.

``add_ucp_args`` is a Megatron-LM ``extra_args_provider``: ``megatron/training/arguments.py``'s
``parse_args(extra_args_provider, ignore_unknown_args)`` calls it with its parser after adding its own
arguments, and it returns the parser. Entry points pass it where their version takes it:

- Megatron-LM <= 0.16 style: ``pretrain(..., extra_args_provider=add_ucp_args)``;
- megatron-core 0.19.x ``megatron/training``: ``parse_and_validate_args(extra_args_provider=add_ucp_args)``
  before building the ``PretrainConfigContainer`` for ``pretrain`` (which no longer takes it).

With a provider of your own, chain them: ``extra_args_provider=lambda p: add_ucp_args(mine(p))``.

The parsed namespace stops at ``UcpOptions.from_args``: nothing past this module sees argparse.
"""
from __future__ import annotations

import argparse
import inspect
import os
from dataclasses import dataclass

from ...errors import UnsupportedError
from ...models import FAMILIES

PATCH_MARK = "from ucp_plugin.integrations import megatron_lm"  # in the patched functions' source


def add_ucp_args(parser: argparse.ArgumentParser, check_patched: bool = True) -> argparse.ArgumentParser:
    """Add ``--universal-checkpoint``, ``--[no-]universal-load-verify`` and
    ``--universal-model-family`` to Megatron-LM's parser, and return it. ``check_patched=False`` is
    for entry points that call ucp_plugin's save/load themselves (no Megatron-LM training loop)."""
    group = parser.add_argument_group(title="universal checkpoint (ucp_plugin)")
    group.add_argument(
        "--universal-checkpoint", action=_UniversalCheckpointFlag if check_patched else "store_true",
        help="Save to --save and load from --load in the universal checkpoint format, which "
             "resumes on any TP/PP/EP/DP layout (needs ucp_plugin's Megatron-LM patch applied: "
             "python patches/apply_megatron_lm.py MEGATRON_LM_ROOT).")
    group.add_argument(
        "--universal-load-verify", action=argparse.BooleanOptionalAction, default=True,
        help="Check the SHA-256 of every chunk read while loading a universal checkpoint "
             "(default: on; --no-universal-load-verify skips it).")
    group.add_argument(
        "--universal-model-family", choices=FAMILIES, default=None,
        help="The parameter patterns to save with (a registered family: ucp_plugin.models.FAMILIES). "
             "Default: inferred from the model flags "
             "(--num-experts: mixtral; --swiglu: llama; otherwise gpt).")
    return parser


class _UniversalCheckpointFlag(argparse.Action):
    """``store_true`` that first checks the importable Megatron-LM is patched: unpatched, the flag
    would silently change nothing (``require_patched``)."""

    def __init__(self, option_strings, dest, default=False, required=False, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, required=required,
                         help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            require_patched()
        except UnsupportedError as e:
            raise argparse.ArgumentError(self, str(e)) from None
        setattr(namespace, self.dest, True)


@dataclass(frozen=True)
class UcpOptions:
    """What ucp_plugin needs from Megatron-LM's command line, as a value."""
    enabled: bool = False
    load_verify: bool = True
    family: str = "gpt"

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"UcpOptions.family={self.family!r} is not a known model family; "
                             f"use one of {FAMILIES} (--universal-model-family)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "UcpOptions":
        """Read the flags of ``add_ucp_args`` (and, to infer the family, Megatron-LM's
        ``num_experts`` / ``swiglu``) from a parsed namespace."""
        if not hasattr(args, "universal_checkpoint"):
            raise ValueError("the Megatron-LM arguments have no 'universal_checkpoint': pass "
                             "extra_args_provider=ucp_plugin.integrations.megatron_lm.flags.add_ucp_args to "
                             "parse_args / parse_and_validate_args / pretrain")
        family = getattr(args, "universal_model_family", None) or infer_family(args)
        return cls(enabled=bool(args.universal_checkpoint),
                   load_verify=bool(getattr(args, "universal_load_verify", True)),
                   family=family)


def infer_family(args: argparse.Namespace) -> str:
    """The model family Megatron-LM's flags describe: a Mixture-of-Experts MLP is ``mixtral``, a
    SwiGLU MLP ``llama``, anything else ``gpt``."""
    if getattr(args, "num_experts", None):
        return "mixtral"
    if getattr(args, "swiglu", False):
        return "llama"
    return "gpt"


def unpatched_functions(module) -> list[str]:
    """Which of ``module``'s ``save_checkpoint`` / ``load_checkpoint`` do not delegate here."""
    missing = []
    for name in ("save_checkpoint", "load_checkpoint"):
        try:
            source = inspect.getsource(getattr(module, name))
        except (AttributeError, TypeError, OSError):
            source = ""
        if PATCH_MARK not in source:
            missing.append(name)
    return missing


def require_patched() -> None:
    """Raise if the importable Megatron-LM's checkpointing is not patched: ``--universal-checkpoint``
    would then be ignored and checkpoints silently saved in Megatron-LM's own format. Without an
    importable ``megatron.training`` there is nothing to check."""
    try:
        from megatron.training import checkpointing
    except ImportError:
        return
    missing = unpatched_functions(checkpointing)
    if missing:
        root = os.path.dirname(os.path.dirname(os.path.dirname(checkpointing.__file__)))
        raise UnsupportedError(f"{checkpointing.__file__}: {' and '.join(missing)} not patched, so "
                               "--universal-checkpoint would be ignored; run: python "
                               f"patches/apply_megatron_lm.py {root}")
