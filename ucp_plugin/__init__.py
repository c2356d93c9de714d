"""ucp_plugin: Universal Checkpointing for DeepSpeed and Megatron-core.

Layers, imports pointing one way (tests/test_imports.py checks): ``format`` -> ``language``
(and ``models``, the families declared in it) -> ``plan`` -> ``storage`` (and ``comm``, ``session``)
-> framework adapters (``deepspeed``, ``megatron``) -> ``integrations`` (Megatron-LM,
Megatron-DeepSpeed) -> ``cli`` / ``tools``. ``testing`` (launcher, CPU shim, harnesses, model builders)
serves tests and recipes only; product code never imports it.
"""
__version__ = "0.1.0"


def wait() -> None:
    """Block until this process's asynchronous save is committed on every rank (collective: every
    rank calls it); raises that save's error on every rank if one failed. Call it before exiting or
    destroying the process group to be sure the last save is published (``async_save``)."""
    from .async_save import wait as _wait

    _wait()


def poll() -> bool:
    """Collective and non-blocking, for step boundaries: commit the asynchronous save in flight if
    every rank has written it. True when none is in flight any more (``async_save``)."""
    from .async_save import poll as _poll

    return _poll()
