"""DeepSpeed's own checkpoint files, read without importing DeepSpeed: a native checkpoint
(``engine.save_checkpoint`` without this plugin, ``native.py``) and a folder written by DeepSpeed's
``ds_to_universal`` (``universal.py``). They are *sources* for the DeepSpeed adapter's loader and the
input of ``ucp convert``. This package sits below ``ucp_plugin.deepspeed`` because importing that
package patches DeepSpeed (its docstring says why): ``ucp convert`` of a native checkpoint needs the
files, not the engine, and so never pays for importing DeepSpeed.
"""
