#!/usr/bin/env bash
# The language-model part of the evidence campaign on a GPU, in one bounded run.
#
# Run from the repository root on the GPU machine (its own Python with torch, transformers):
#   bash scripts/gpu_campaign.sh            # carry .data/janeaustenr (with its austen.txt cache)
# Every plan entry below resumes from the results.jsonl in its folder; the run stops cleanly
# (SIGINT, finished runs kept) after $BUDGET seconds; the results files are then copied under
# $OUT, to be copied back over docs/results/ and committed. Rows record the GPU's name.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/ibnorm-gpu-out}
BUDGET=${BUDGET:-480}
ENTRIES=${ENTRIES:-"sweep-austen-llama check-austen-llama final-austen-llama final-austen-gpt2"}

python - <<'EOF' || { echo "gpu_campaign: missing requirements, nothing run"; exit 2; }
import importlib, sys
import torch
missing = [m for m in ("transformers", "tqdm", "numpy") if importlib.util.find_spec(m) is None]
if missing or not torch.cuda.is_available():
    sys.exit(f"gpu_campaign: need CUDA and {missing or 'nothing else'}")
print("gpu_campaign:", torch.cuda.get_device_name(), "torch", torch.__version__)
EOF
test -f .data/janeaustenr/austen.txt || { echo "gpu_campaign: .data/janeaustenr/austen.txt missing: run 'make data' and load the text once, then carry .data/janeaustenr"; exit 2; }

deadline=$((SECONDS + BUDGET))
for entry in $ENTRIES; do
  left=$((deadline - SECONDS))
  [ "$left" -gt 30 ] || break
  timeout --signal=INT "$left" python -m ibnorm.lab.cli results --only "$entry" --device cuda --no-progress
  echo "gpu_campaign: $entry exited with $?"
done

for entry in $ENTRIES; do
  if [ -f "docs/results/$entry/results.jsonl" ]; then
    mkdir -p "$OUT/docs/results/$entry"
    cp "docs/results/$entry/results.jsonl" "$OUT/docs/results/$entry/"
  fi
done
echo "gpu_campaign: results under $OUT/docs/results"
