"""Megatron-LM (``megatron/training``) glue: ``flags`` (``add_ucp_args``, ``UcpOptions``, the patch
check) and ``checkpointing`` (Megatron-LM's ``save_checkpoint`` / ``load_checkpoint`` signatures,
translated for ``ucp_plugin.megatron.checkpoint``). Megatron-LM's patched checkpointing calls
``ucp_plugin.integrations.megatron_lm.save_checkpoint`` / ``load_checkpoint`` (``patches/``)."""
from .checkpointing import load_checkpoint, save_checkpoint
from .flags import UcpOptions, add_ucp_args

__all__ = ["UcpOptions", "add_ucp_args", "load_checkpoint", "save_checkpoint"]
