#!/usr/bin/env bash
# GPU check (not needed by CI): on one CUDA device, DeepSpeed ZeRO-2 <-> ZeRO-3 (NCCL, bf16, FusedAdam)
# and megatron-core with the DistributedOptimizer at world size 1, save -> resume; one verdict line
# per case (ucp_plugin/testing/gpu_check.py). Where CUDA is absent it prints one SKIP line, exit 0.
#   scripts/gpu_check.sh                 # on a GPU machine
#   scripts/gpu_check.sh --cpu-dry-run   # the same Python on CPU over gloo
# DeepSpeed / megatron-core missing? They are installed from wheels in ./.whl (no network needed):
#   pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
#   pip download megatron-core==0.16.1 <deps> --no-deps --python-version 3.12 --only-binary=:all: -d .whl
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
PY="${PYTHON:-python3}"
DRY=""
[ "${1:-}" = "--cpu-dry-run" ] && DRY="--cpu-dry-run"

if [ -z "$DRY" ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: SKIP: no CUDA device here (torch.cuda.is_available() is False); nothing was run"
    exit 0
fi

for module in deepspeed megatron.core; do
    if ! "$PY" -c "import $module" >/dev/null 2>&1; then
        if [ -d .whl ]; then
            echo "gpu_check: installing the wheels in .whl ($module is not importable)"
            "$PY" -m pip install -q --no-index --find-links .whl --no-deps .whl/*.whl || exit 1
        else
            echo "gpu_check: FAIL: $module is not importable and there is no .whl folder to install it from"
            exit 1
        fi
    fi
done

status=0
# each case in its own process (its own process group) and time limit: under 5 minutes in all (the
# first DeepSpeed case JIT-builds FusedAdam; the second finds it built)
for spec in ds-zero2-to-zero3:130 ds-zero3-to-zero2:90 megatron-distopt:70; do
    case="${spec%%:*}"
    log="/tmp/gpu_check.$case.log"
    timeout "${spec##*:}" "$PY" -m ucp_plugin.testing.gpu_check "$case" $DRY >"$log" 2>&1
    rc=$?
    out=$(grep "^gpu_check: $case: " "$log")  # DeepSpeed prints on stdout too
    if [ -n "$out" ]; then
        echo "$out"
    else
        echo "gpu_check: $case: FAIL (exit $rc: no verdict within ${spec##*:} s; log $log)"
        tail -5 "$log"
    fi
    [ $rc -ne 0 ] && status=1
done
exit $status
