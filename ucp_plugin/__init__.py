"""ucp_plugin: Universal Checkpointing for DeepSpeed and Megatron-core.

Layers, imports pointing one way (tests/test_imports.py checks): ``format`` -> ``language``
(and ``models``, the families declared in it) -> ``plan`` -> ``storage`` (and ``comm``, ``session``)
-> framework adapters (``deepspeed``, ``megatron``) -> ``integrations`` (Megatron-LM,
Megatron-DeepSpeed) -> ``cli`` / ``tools``. ``testing`` (launcher, CPU shim, harnesses, model builders)
serves tests and recipes only; product code never imports it.
"""
__version__ = "0.1.0"
