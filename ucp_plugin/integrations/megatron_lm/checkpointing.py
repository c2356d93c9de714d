"""Megatron-LM's ``save_checkpoint`` / ``load_checkpoint`` for universal checkpoints.

``megatron/training/checkpointing.py`` (megatron-core 0.19.0-0.19.2), patched by
``patches/apply_megatron_lm.py``, calls these with its own arguments when ``--universal-checkpoint``
is set (``flags.add_ucp_args``). They keep Megatron-LM's signatures and return values — save returns
None; load returns ``(iteration, num_floating_point_operations_so_far)``, ``(0, 0)`` when there is
nothing to load — and translate its objects for the Megatron adapter
(``ucp_plugin.megatron.checkpoint.save_universal`` / ``load_universal``).

What carries over from Megatron-LM: ``--save`` / ``--load`` (or ``load_arg``), ``--ckpt-step``,
``--pretrained-checkpoint`` (load it when ``--load`` holds nothing, as a finetune), ``--finetune``,
``--no-save-optim``, ``--no-load-optim``, the training progress (iteration, FLOPs, consumed and
skipped samples) and an external dataloader's state (``--dataloader-save``, saved by Megatron-LM's
own helper). Tags are Megatron-LM's (``iter_0000100``, ``release``); the folder's ``latest`` file
is the universal format's own, so Megatron-LM's native loader does not mistake it for its format.
The process groups and rank overrides are not used: the adapter reads megatron's ``parallel_state``.
Non-persistent checkpoints and the FSDP2 in-place load are refused (``UnsupportedError``).

``--async-save`` saves asynchronously (``ucp_plugin.async_save``): ``save_checkpoint`` returns once
this rank's state is in host memory. Megatron-LM's own ``maybe_finalize_async_save`` only knows its
own queue, so the universal save is committed at the next ``save_checkpoint`` or
``load_checkpoint``, at ``ucp_plugin.poll()`` / ``ucp_plugin.wait()`` if the training script calls
them, or at process exit (while the process group is up); until then ``latest`` names the previous
checkpoint. The dataloader state (``--dataloader-save``) is still written synchronously. Megatron-LM
0.19's ``validate_args`` turns ``--async-save`` off with a dist-ckpt format unless
``--use-persistent-ckpt-worker`` is given too: pass both (the worker itself is not used here).
"""
from __future__ import annotations

import logging
import os
from typing import Any

from ...errors import FormatError, UnsupportedError
from ...format import MANIFEST
from ...storage import read_latest
from .flags import UcpOptions, require_patched, unpatched_functions  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

NATIVE_TRACKER = "latest_checkpointed_iteration.txt"  # Megatron-LM's own "latest" file
PROGRESS_KEYS = ("consumed_train_samples", "skipped_train_samples", "consumed_valid_samples")


def save_checkpoint(iteration, model, optimizer, opt_param_scheduler,
                    num_floating_point_operations_so_far, checkpointing_context=None,
                    pipeline_rank=None, expert_rank=None, tensor_rank=None, pipeline_parallel=None,
                    expert_parallel=None, non_persistent_ckpt=False, train_data_iterator=None,
                    preprocess_common_state_dict_fn=None, release=False, tp_group=None,
                    pp_group=None, dp_cp_group=None, dp_group=None, expt_dp_group=None,
                    rng_state_key_prefix=''):
    """Save ``iteration``'s model chunks, optimizer and scheduler to ``args.save`` as a universal
    checkpoint tagged like Megatron-LM's (``iter_%07d`` or ``release``). Returns None."""
    args = megatron_args()
    opts = UcpOptions.from_args(args)
    if non_persistent_ckpt:
        raise UnsupportedError("--universal-checkpoint does not write non-persistent checkpoints: "
                               "drop --non-persistent-save-interval, or launch without "
                               "--universal-checkpoint")
    save_dir = _required(args, "save")
    asynchronous = bool(getattr(args, "async_save", False))
    from ...megatron.checkpoint import save_universal

    save_universal(model, None if getattr(args, "no_save_optim", False) else optimizer,
                   save_dir, checkpoint_tag(iteration, release), iteration,
                   None if opt_param_scheduler is None else opt_param_scheduler.state_dict(),
                   progress_state(args, num_floating_point_operations_so_far),
                   family=opts.family, async_save=asynchronous)
    _save_dataloader_state(args, train_data_iterator, iteration, tp_group, pp_group, dp_group)
    log.info("%s universal checkpoint %s/%s", "saving (asynchronously)" if asynchronous else "saved",
             save_dir, checkpoint_tag(iteration, release))


def load_checkpoint(ddp_model, optimizer, opt_param_scheduler, load_arg='load', strict=True,
                    checkpointing_context=None, skip_load_to_model_and_opt=False, tp_group=None,
                    pp_group=None, dp_cp_group=None, dp_group=None, expt_dp_group=None,
                    rng_state_key_prefix=''):
    """Load the universal checkpoint in ``getattr(args, load_arg)`` (its ``latest``, or
    ``--ckpt-step``) into the model chunks, optimizer and scheduler, on this run's layout. Returns
    ``(iteration, num_floating_point_operations_so_far)``; ``(0, 0)`` if there is none. A universal
    load is always strict: ``strict=False`` does not relax it."""
    args = megatron_args()
    opts = UcpOptions.from_args(args)
    if skip_load_to_model_and_opt:
        raise UnsupportedError("--universal-checkpoint cannot load in place for torch FSDP2 "
                               "(--use-torch-fsdp2); launch without --universal-checkpoint")
    load_dir = resolve_load_dir(args, load_arg)
    if load_dir is None:
        return 0, 0
    finetune = bool(getattr(args, "finetune", False))
    with_optim = optimizer is not None and not finetune and not getattr(args, "no_load_optim", False)
    from ...megatron.checkpoint import load_universal

    state = load_universal(ddp_model, optimizer if with_optim else None, load_dir,
                           tag=_step_tag(args), verify=opts.load_verify)
    if with_optim and opt_param_scheduler is not None and state.get("scheduler_state") is not None:
        opt_param_scheduler.load_state_dict(state["scheduler_state"])
    if not with_optim and optimizer is not None and _half(args):
        optimizer.reload_model_params()  # fp32 main params from the loaded weights, as upstream
    extra = state.get("extra_state") or {}
    if not finetune:
        restore_progress(args, extra)
    log.info("loaded universal checkpoint %s at iteration %s", load_dir, state["iteration"])
    iteration = 0 if finetune else int(state["iteration"])
    return iteration, extra.get("num_floating_point_operations_so_far", 0)


def megatron_args():
    """Megatron-LM's global arguments (``megatron.training.get_args``)."""
    from megatron.training.global_vars import get_args

    return get_args()




def checkpoint_tag(iteration: int, release: bool = False) -> str:
    """Megatron-LM's folder name for a checkpoint (``get_checkpoint_name``)."""
    return "release" if release else f"iter_{int(iteration):07d}"


def progress_state(args, num_floating_point_operations_so_far) -> dict[str, Any]:
    """The training progress Megatron-LM keeps in its checkpoint's ``args`` and top level."""
    state = {key: int(getattr(args, key, 0) or 0) for key in PROGRESS_KEYS}
    state["num_floating_point_operations_so_far"] = num_floating_point_operations_so_far
    return state


def restore_progress(args, extra: dict[str, Any]) -> None:
    """Put the saved sample counters back into Megatron-LM's arguments and microbatch schedule."""
    for key in PROGRESS_KEYS:
        setattr(args, key, int(extra.get(key, 0)))
    from megatron.core.num_microbatches_calculator import update_num_microbatches

    update_num_microbatches(consumed_samples=args.consumed_train_samples, verbose=True)


def has_universal_checkpoint(path: str | None) -> bool:
    """Whether ``path`` is a committed checkpoint or a save folder with a ``latest`` file (a broken
    one then fails at load with the reason, instead of silently starting from scratch)."""
    if not path or not os.path.isdir(path):
        return False
    return os.path.isfile(os.path.join(path, MANIFEST)) or read_latest(path) is not None


def resolve_load_dir(args, load_arg: str = "load") -> str | None:
    """The folder to load (Megatron-LM's rules), or None to start from scratch. Falls back to
    ``--pretrained-checkpoint`` as a finetune when ``--load`` holds no checkpoint."""
    load_dir = getattr(args, load_arg, None)
    if has_universal_checkpoint(load_dir):
        return load_dir
    pretrained = getattr(args, "pretrained_checkpoint", None)
    if pretrained is not None and load_arg != "pretrained_checkpoint":
        if not has_universal_checkpoint(pretrained):
            raise FormatError(f"no universal checkpoint in --load {load_dir} nor in "
                              f"--pretrained-checkpoint {pretrained}; pass a folder saved with "
                              "--universal-checkpoint (it has 'latest' or ucp.json)")
        args.finetune = True
        return pretrained
    if load_dir and os.path.isfile(os.path.join(load_dir, NATIVE_TRACKER)):
        raise FormatError(f"{load_dir}: holds a Megatron-LM native checkpoint ({NATIVE_TRACKER}), "
                          "not a universal one; resume it without --universal-checkpoint, or save "
                          "it again with --universal-checkpoint into another folder")
    if load_dir:
        log.warning("no universal checkpoint in %s: starting from scratch", load_dir)
    return None


def _required(args, name: str) -> str:
    path = getattr(args, name, None)
    if not path:
        raise UnsupportedError(f"--universal-checkpoint needs --{name} DIR (Megatron-LM's "
                               f"args.{name} is empty)")
    return path


def _half(args) -> bool:
    return bool(getattr(args, "fp16", False) or getattr(args, "bf16", False))


def _step_tag(args) -> str | None:
    step = getattr(args, "ckpt_step", None)
    return checkpoint_tag(step) if step else None


def _save_dataloader_state(args, train_data_iterator, iteration, tp_group, pp_group, dp_group):
    """An external dataloader's state goes to ``--dataloader-save``, beside the checkpoint, through
    Megatron-LM's own helper (a no-op for its built-in dataloader)."""
    path = getattr(args, "dataloader_save", None)
    if train_data_iterator is None or not path:
        return
    from megatron.training.checkpointing import maybe_save_dataloader_state

    maybe_save_dataloader_state(train_data_iterator, iteration, path, tp_group=tp_group,
                                pp_group=pp_group, dp_group=dp_group)
