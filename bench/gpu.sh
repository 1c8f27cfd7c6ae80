#!/usr/bin/env bash
# Every benchmark on one GPU (H100/H200), under 6 minutes; the tables go to $1 (default bench_results.md).
#
#   bash bench/gpu.sh [results.md]
#
# Needs jax with CUDA, flax, optax, ml_collections, scikit-learn and, for the PyTorch baseline, torch.
# Each part runs under a time limit (60 + 250 + 40 s) so the whole stays under 6 minutes; a part that
# fails or runs out of time leaves a note, and train_step.py keeps the rows it finished.
set -u
out=$(realpath -m "${1:-bench_results.md}")
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step_md=$(mktemp)
trap 'rm -f "$step_md"' EXIT

limited() {  # limited SECONDS COMMAND...: run it, and on failure or timeout say so instead of stopping
  local seconds=$1 status
  shift
  timeout "$seconds" "$@"
  status=$?
  if [ "$status" -ne 0 ]; then echo "($* stopped with exit status $status; 124 = out of time)"; fi
}

echo "# spcl_jax benchmarks ($(date -u '+%Y-%m-%d %H:%M UTC'), bench/gpu.sh)" > "$out"
{ printf '\n## k-means\n\n```\n'; limited 60 python bench/kmeans.py --gpu; printf '```\n'; } | tee -a "$out"
note=$(limited 250 python bench/train_step.py --preset gpu --compare-torch --out "$step_md" \
  | tee /dev/stderr | grep '^(')
{ echo; cat "$step_md"; echo "$note"; } >> "$out"
{ printf '\n## Input pipeline\n\n```\n'; limited 40 python bench/input_pipeline.py --images 128; printf '```\n'; } \
  | tee -a "$out"
echo "tables written to $out"
