"""Megatron-core adapter. Importing this package changes nothing; ``distopt_fixes.install()`` is
always an explicit call.

- ``checkpoint``: ``save_universal`` / ``load_universal`` of megatron-core GPT models at any layout
  (``model_view``: a rank's parameters in the checkpoint language; ``optimizer_view``: where the
  optimizer keeps masters and states; ``vocab_padding``: megatron's trained padding rows);
- ``validate``: ``validate_layout(checkpoint, layout)`` refuses a target layout the saved model cannot
  have (TP vs heads / query groups, PP vs layers, EP vs experts) from the manifest alone, before
  anything is built or read;
- ``layout``: ``MegatronLayout``, a parallel layout as a validated value;
- ``distopt_fixes``: megatron-core 0.16's DistributedOptimizer with torch's AdamW (no apex/TE).

Megatron-LM and Megatron-DeepSpeed glue: ``ucp_plugin.integrations``; the test/recipe harness and model
builders: ``ucp_plugin.testing``.
"""
