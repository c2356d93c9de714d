"""What tests and recipes share; product code never imports it (tests/test_imports.py checks).

- ``launcher``: a torchrun-like local launcher for CPU/gloo runs (``python -m ucp_plugin.testing.launcher``);
- ``cpu_shim``: lets megatron-core 0.16 run on a CPU-only machine (explicit ``install()``);
- ``build``: the toy fp32, dropout-free, CPU-initialised stage ``GPTModel`` of a family and layout, and
  ``init_parallel_state`` (megatron's process groups for a ``MegatronLayout``);
- ``reference_init``: layout-independent initial weights, so every layout trains the same model;
- ``harness`` / ``deepspeed_harness``: a small training loop on megatron's optimizer / a DeepSpeed engine;
- ``nccl_rule``: NCCL's device rule emulated for the plugin's own collectives (``UCP_EMULATE_NCCL=1``);
- ``group_step_adam``: a CPU stand-in for Transformer Engine's FusedAdam (``step`` per param group);
- ``gpu_check``: the cases of ``scripts/gpu_check.sh`` (``--cpu-dry-run`` on CPU).
"""
