#!/usr/bin/env bash
# The language-model part of the evidence campaign on a GPU, in one bounded run.
#
# Run from the repository root on the GPU machine (its own Python with torch, transformers):
#   bash scripts/gpu_campaign.sh            # carry .data/janeaustenr (with its austen.txt cache)
# Each entry below runs as $WORKERS shards at once (`ibnorm results --shard K/N`, separate
# processes on one results folder): a tiny LM leaves an H100 mostly idle, so shards multiply the
# runs per minute. Every entry resumes from the results.jsonl in its folder; all shards are
# stopped after $BUDGET seconds (SIGTERM: background jobs of a script ignore SIGINT), which
# loses only the runs in progress, since results.jsonl is rewritten atomically after each run. Each entry's results file is then
# copied to $OUT/<entry>.jsonl; back here, `ibnorm results --merge <that folder> --report-only`
# adds the runs the local files lack and rewrites the reports. Rows record the GPU's name.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2
OUT=${OUT:-/tmp/ibnorm-gpu-out}
BUDGET=${BUDGET:-480}
WORKERS=${WORKERS:-4}  # per entry: 2 entries x 4 shards x 2 threads fill 16 cores
ENTRIES=${ENTRIES:-"final-austen-llama final-austen-gpt2"}
DEVICE=${DEVICE:-cuda}  # cpu: a rehearsal of this script on any machine

DEVICE=$DEVICE python - <<'EOF' || { echo "gpu_campaign: missing requirements, nothing run"; exit 2; }
import importlib, os, sys
import torch
missing = [m for m in ("transformers", "tqdm", "numpy") if importlib.util.find_spec(m) is None]
cuda = os.environ["DEVICE"] == "cuda"
if missing or (cuda and not torch.cuda.is_available()):
    sys.exit(f"gpu_campaign: need {'CUDA and ' if cuda else ''}{missing or 'nothing else'}")
print("gpu_campaign:", torch.cuda.get_device_name() if cuda else "CPU", "torch", torch.__version__)
EOF
test -f .data/janeaustenr/austen.txt || { echo "gpu_campaign: .data/janeaustenr/austen.txt missing: run 'make data' and load the text once, then carry .data/janeaustenr"; exit 2; }

LOGS=$(mktemp -d)
mkdir -p "$OUT"
for entry in $ENTRIES; do
  for ((k = 0; k < WORKERS; k++)); do
    timeout --kill-after=20 "$BUDGET" python -m ibnorm.lab.cli results --only "$entry" --device "$DEVICE" --no-progress \
      --shard "$k/$WORKERS" > "$LOGS/$entry-$k.log" 2>&1 &
  done
done
wait
tail -n 3 "$LOGS"/*.log > "$OUT/gpu_campaign_logs.txt"  # (few files come back: one log)
cat "$OUT/gpu_campaign_logs.txt"
for entry in $ENTRIES; do
  if [ -f "docs/results/$entry/results.jsonl" ]; then
    cp "docs/results/$entry/results.jsonl" "$OUT/$entry.jsonl"
    echo "gpu_campaign: $entry: $(wc -l < "$OUT/$entry.jsonl") runs in $OUT/$entry.jsonl"
  fi
done
