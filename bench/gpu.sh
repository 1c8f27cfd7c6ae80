#!/usr/bin/env bash
# Every benchmark on one GPU (H100/H200), under 10 minutes; the tables go to $1 (default bench_results.md).
#
#   bash bench/gpu.sh [results.md]
#
# Needs jax with CUDA, flax, optax, ml_collections, scikit-learn and, for the PyTorch baseline, torch.
# Each part runs under a time limit (45 + 150 + 130 + 25 + 150 + 100 s) so the whole stays under 10 minutes; a
# part that fails or runs out of time leaves a note, and train_step.py and epoch_overhead.py keep the rows they
# finished (both put their most important rows first).
# The input pipeline's loader throughput (worker processes, 5 rounds) is a CPU measurement left to bench/all.sh.
set -u
out=$(realpath -m "${1:-bench_results.md}")
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
table_md=$(mktemp)
trap 'rm -f "$table_md"' EXIT

limited() {  # limited SECONDS COMMAND...: run it, and on failure or timeout say so instead of stopping
  local seconds=$1 status
  shift
  timeout "$seconds" "$@"
  status=$?
  if [ "$status" -ne 0 ]; then echo "($* stopped with exit status $status; 124 = out of time)"; fi
}

tables() {  # tables SECONDS SCRIPT ARGS...: a script that rewrites its tables to --out after every row
  local seconds=$1 note
  shift
  : > "$table_md"
  note=$(limited "$seconds" python "$@" --out "$table_md" | tee /dev/stderr | grep '^(')
  { echo; cat "$table_md"; echo "$note"; } >> "$out"
}

echo "# spcl_jax benchmarks ($(date -u '+%Y-%m-%d %H:%M UTC'), bench/gpu.sh)" > "$out"
{ printf '\n## k-means\n\n```\n'; limited 45 python -m bench.kmeans --gpu; printf '```\n'; } | tee -a "$out"
tables 150 -m bench.train_step --preset gpu --compare-torch
tables 130 -m bench.epoch_overhead --preset gpu
{ printf '\n## Input pipeline\n\n'; limited 25 python -m bench.input_pipeline --images 128 --skip-loader; } | tee -a "$out"
{ printf '\n## Prepared records feeding the ResNet-50 step\n\n'; limited 150 python -m bench.loader_step --preset gpu; } \
  | tee -a "$out"
# What the planner says of this GPU, for the train_step table's ResNet-50 row (compiled, not run): its bytes, FLOPs
# and least step time beside the measured step.
case "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)" in
  *H200*) target=h200x1 ;; *A100*) target=a100-80x1 ;; *) target=h100x1 ;;
esac
{ printf '\n## Planned for this GPU (spcl-plan %s, the train_step table'"'"'s ResNet-50 row)\n\n' "$target"
  limited 100 python -m spcl_jax.plan --config configs/imagenet.py --target "$target" --quick \
    --config.batch_size=128; } | tee -a "$out"
echo "tables written to $out"
