"""scripts/gpu_check.sh where there is no GPU: it skips with one line and exit 0, and its Python
cases run on CPU over gloo (``--cpu-dry-run``), so the code a GPU machine runs is not untested."""
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here: the script would run its cases")
def test_skips_without_cuda():
    out = subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_check.sh")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.splitlines() == [
        "gpu_check: SKIP: no CUDA device here (torch.cuda.is_available() is False); nothing was run"]


@pytest.mark.parametrize("case", ["megatron-distopt", "ds-zero3-to-zero2"])
def test_cases_run_on_cpu(case, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "ucp_plugin.testing.gpu_check", case, "--cpu-dry-run",
                          "--dir", str(tmp_path)], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    print(out.stdout)
    assert out.returncode == 0, out.stderr[-3000:]
    verdicts = [line for line in out.stdout.splitlines() if line.startswith("gpu_check: ")]
    assert len(verdicts) == 1 and verdicts[0].startswith(f"gpu_check: {case}: PASS "), out.stdout[-2000:]
