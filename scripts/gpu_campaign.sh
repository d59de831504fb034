#!/usr/bin/env bash
# The language-model part of the evidence campaign on a GPU, in one bounded run.
#
# Run from the repository root on the GPU machine (its own Python with torch, transformers):
#   bash scripts/gpu_campaign.sh            # carry .data/janeaustenr (with its austen.txt cache)
# Each entry below runs as $WORKERS shards at once (`ibnorm results --shard K/N`, separate
# processes on one results folder): a tiny LM leaves an H100 mostly idle, so shards multiply the
# runs per minute. Every entry resumes from the results.jsonl in its folder; all shards are
# stopped after $BUDGET − $ANALYZE seconds by SIGTERM (background jobs of a script ignore SIGINT), which the
# CLI takes as Ctrl-C: finished runs are kept (results.jsonl is rewritten after each run), the
# runs in progress are lost. Exit status 1 if a shard failed otherwise. Each shard analyses its final
# runs as it trains them (`compare --analyze-finals`); the last $ANALYZE of the $BUDGET seconds analyse
# those still without rows (`ibnorm analyze`: kurtosis, sparsity, MI; their models do not come back,
# so the analysis is made where they are; it resumes, run by run). Each
# entry's results file is then copied to $OUT/<entry>.jsonl and its analysis rows to
# $OUT/<entry>.analysis.jsonl; back here, `ibnorm results --merge <that folder> --report-only` adds the
# runs and analysis rows the local files lack and rewrites the reports. Rows record the GPU's name.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2
OUT=${OUT:-/tmp/ibnorm-gpu-out}
BUDGET=${BUDGET:-480}
ANALYZE=${ANALYZE:-120}  # of BUDGET, for the analysis after training
WORKERS=${WORKERS:-8}  # per entry: 8 shards x 2 threads fill 16 cores
ENTRIES=${ENTRIES:-"final-austen-gpt2"}  # final-austen-llama is complete (32 of 32 runs, 2026-11-29)
DEVICE=${DEVICE:-cuda}  # cpu: a rehearsal on any machine (in a scratch clone: it trains into docs/results)

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

[ "$ANALYZE" -ge 0 ] && [ "$BUDGET" -gt "$ANALYZE" ] ||
  { echo "gpu_campaign: need 0 <= ANALYZE < BUDGET (seconds), got ANALYZE=$ANALYZE BUDGET=$BUDGET"; exit 2; }

LOGS=$(mktemp -d)
mkdir -p "$OUT"
declare -A shard_of
for entry in $ENTRIES; do
  for ((k = 0; k < WORKERS; k++)); do
    timeout --kill-after=30 "$((BUDGET - ANALYZE))" python -m ibnorm.lab.cli results --only "$entry" --device "$DEVICE" --no-progress \
      --shard "$k/$WORKERS" > "$LOGS/$entry-$k.log" 2>&1 &
    shard_of[$!]="$entry-$k"
  done
done
status=0
for pid in "${!shard_of[@]}"; do
  wait "$pid"
  code=$?
  # 0: the shard's share is done; 124: stopped at the budget (finished runs kept)
  echo "gpu_campaign: shard ${shard_of[$pid]} exited with $code" >> "$LOGS/exit_codes"
  [ "$code" -eq 0 ] || [ "$code" -eq 124 ] || status=1
done
declare -A analysis_of
for entry in $ENTRIES; do  # no --retrain-missing: runs trained elsewhere are analysed where their models are
  if [ "$ANALYZE" -gt 0 ] && [ -f "docs/results/$entry/results.jsonl" ]; then
    OMP_NUM_THREADS=8 timeout --kill-after=10 "$ANALYZE" python -m ibnorm.lab.cli analyze "docs/results/$entry" --no-progress \
      > "$LOGS/$entry-analyze.log" 2>&1 &
    analysis_of[$!]="$entry"
  fi
done
for pid in "${!analysis_of[@]}"; do
  wait "$pid"
  # 0: done; 124: stopped at the budget (the rows of the runs analysed so far are kept); 2: no run
  # of the entry has its model here
  echo "gpu_campaign: analysis of ${analysis_of[$pid]} exited with $?" >> "$LOGS/exit_codes"
done
cat "$LOGS/exit_codes"
{ cat "$LOGS/exit_codes"; tail -n 20 "$LOGS"/*.log; } > "$OUT/gpu_campaign_logs.txt"  # one file: few come back
for entry in $ENTRIES; do
  if [ -f "docs/results/$entry/results.jsonl" ]; then
    cp "docs/results/$entry/results.jsonl" "$OUT/$entry.jsonl"
    echo "gpu_campaign: $entry: $(wc -l < "$OUT/$entry.jsonl") runs in $OUT/$entry.jsonl"
  fi
  if [ -f "docs/results/$entry/analysis.jsonl" ]; then
    cp "docs/results/$entry/analysis.jsonl" "$OUT/$entry.analysis.jsonl"
    echo "gpu_campaign: $entry: $(wc -l < "$OUT/$entry.analysis.jsonl") analysis rows in $OUT/$entry.analysis.jsonl"
  fi
done
exit $status
