"""Megatron-core adapter. Importing this package changes nothing; ``cpu_shim.install()`` (CPU-only
machines) and ``distopt_fixes.install()`` are always explicit calls.

- ``checkpoint``: ``save_universal`` / ``load_universal`` of megatron-core GPT models at any layout
  (``model_view``: a rank's parameters in the checkpoint language; ``optimizer_view``: where the
  optimizer keeps masters and states; ``vocab_padding``: megatron's trained padding rows);
- ``validate``: ``validate_layout(checkpoint, layout)`` refuses a target layout the saved model cannot
  have (TP vs heads / query groups, PP vs layers, EP vs experts) from the manifest alone, before
  anything is built or read;
- ``build`` / ``layout``: the stage model of a family and layout, megatron's process groups;
- ``harness`` / ``reference_init``: a small training loop for tests and recipes (``resume``: validate,
  build, load);
- ``flags`` / ``megatron_lm``: the Megatron-LM launch flags and checkpointing glue.
"""
