"""Megatron-DeepSpeed: a megatron-core model inside a DeepSpeed engine. Importing this package
registers ``MegatronBinding`` with the DeepSpeed adapter (``ucp_plugin.deepspeed.params``); pass
``mpu=MegatronMPU()`` to ``deepspeed.initialize`` (``binding``)."""
from .binding import MegatronBinding, MegatronMPU

__all__ = ["MegatronBinding", "MegatronMPU"]
