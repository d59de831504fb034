#!/usr/bin/env bash
# GPU check of the hand-written Triton kernels, in one bounded run (under 8 minutes).
#
# Run from the repository root on the GPU machine (its own Python with torch and triton;
# no venv, no install):
#   bash scripts/gpu_check.sh
# 1. the CUDA tests of tests/test_triton.py (kernels against the reference at real sizes);
# 2. `ibnorm bench --device cuda`: time and GB/s of the kernels vs the torch parents and vs
#    torch.compile of the composite, into benchmarks/results/kernels_cuda.{csv,png} (the CSV
#    grows case by case, so a run cut short keeps what it measured).
# Both outputs are copied under $OUT when it is set. Exit status: 0 if both steps passed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src HF_HUB_OFFLINE=1
RESULTS=benchmarks/results

python - <<'PY' || { echo "gpu_check: missing requirements, nothing run"; exit 2; }
import importlib.util, sys
import torch
missing = [m for m in ("triton", "pytest", "numpy", "tqdm") if importlib.util.find_spec(m) is None]
if missing or not torch.cuda.is_available():
    sys.exit(f"gpu_check: need CUDA and {missing or 'nothing else'}")
import triton
print("gpu_check:", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
PY

status=0
mkdir -p "$RESULTS"
# --noconftest: the suite's conftest needs hypothesis, which this check does not.
timeout 210 python -m pytest tests/test_triton.py -m cuda -q -p no:cacheprovider --noconftest -rs \
  2>&1 | tee "$RESULTS/gpu_check_tests.txt"
test_status=${PIPESTATUS[0]}
echo "gpu_check: tests exited with $test_status"
[ "$test_status" -eq 0 ] || status=1

timeout 240 python -m ibnorm.lab.cli bench --device cuda --groupings layer batch group rms --models --out "$RESULTS"
bench_status=$?
echo "gpu_check: benchmark exited with $bench_status"
[ "$bench_status" -eq 0 ] || status=1

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/$RESULTS"
  cp "$RESULTS"/kernels_cuda.csv "$RESULTS"/kernels_cuda.png "$RESULTS"/gpu_check_tests.txt "$OUT/$RESULTS/" 2>/dev/null
  echo "gpu_check: results under $OUT/$RESULTS"
fi
exit $status
