#!/usr/bin/env bash
# Installs everything ucp_plugin, its tests and its recipes need, in the order that keeps pip from
# fetching a multi-GB CUDA torch: the CPU torch 2.13.0 first, then DeepSpeed from its sdist against
# it (--no-build-isolation), then megatron-core 0.16.1 (newest for Python 3.11), then the plugin.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
pip_install "torch==2.13.0"
pip_install --no-build-isolation "deepspeed==0.19.8" "megatron-core==0.16.1" \
  "safetensors>=0.4" packaging tqdm numpy matplotlib pytest hypothesis
pip_install "transformers==5.24.0" "accelerate==1.16.0"  # the hf extra (tests of HF export/import, Trainer)
pip_install --no-build-isolation --no-deps -e .
# DeepSpeed's default optimizer (FusedAdam) and its ZeRO-Offload one (DeepSpeedCPUAdam) compile on first
# use (1-10 min on a small CPU machine, cached in ~/.cache/torch_extensions): build them once here so no
# test pays it. The accelerator picks the builders (CPU ones here, CUDA ones on a GPU machine).
"$PY" -c "
from deepspeed.accelerator import get_accelerator
for name in ('FusedAdamBuilder', 'CPUAdamBuilder'):
    get_accelerator().create_op_builder(name).load(verbose=False)
print('prebuilt DeepSpeed ops: FusedAdam, CPUAdam')"
"$PY" -c "import torch, deepspeed, megatron.core, ucp_plugin; print('env ok: torch', torch.__version__, 'deepspeed', deepspeed.__version__)"
