"""Integrations: ucp_plugin inside another project's training loop, on top of the framework adapters
(``ucp_plugin.deepspeed``, ``ucp_plugin.megatron``). Importing this package imports nothing.

- ``megatron_lm``: Megatron-LM's launch flags (``flags.add_ucp_args``) and the ``save_checkpoint`` /
  ``load_checkpoint`` its patched ``megatron/training/checkpointing.py`` delegates to;
- ``megatron_deepspeed``: a megatron-core model trained by a DeepSpeed engine (``MegatronMPU``), saved
  by the DeepSpeed adapter with megatron's atom names.
"""
