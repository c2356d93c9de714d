"""ucp_plugin: Universal Checkpointing for DeepSpeed and Megatron-core.

Layers, imports pointing one way: ``format`` -> ``language`` -> ``plan`` -> ``storage`` ->
framework adapters (``deepspeed``, ``megatron``) -> ``cli``. Model families live in ``models/`` and
import only the language.
"""
__version__ = "0.1.0"
