#!/usr/bin/env bash
# Every benchmark behind a BENCHMARKS.md table, one after the other, each with the arguments its table is made
# with; everything (stdout and stderr) also goes to a dated log.
#
#   bash bench/all.sh [LOG]                        # LOG default: runs/bench-<UTC date and time>.log
#   PYTHON=VENV/bin/python bash bench/all.sh       # with torch and faiss-cpu (bench/requirements.txt):
#       python -m venv --system-site-packages VENV && VENV/bin/pip install -r bench/requirements.txt
#   BENCH_ONLY="kmeans cpu_conv" bash bench/all.sh # only these parts;  BENCH_SKIP="ablation": all but these
#
# Parts, in order (CPU times on 2 cores, roughly): kmeans (~25 min), cpu_conv (~2 min), train_step (full width,
# 2 threads, interleaved with the PyTorch original and YNNPACK convolutions; ~10 min), train_step_1core (the
# same on one core, torch at one thread; ~20 min), train_step_narrow (width 1/16; ~2 min), cpu_step_profile
# (~2 min), huge_pages (the demo's step, ~3 min), huge_pages_full (full width, ~4 min), epoch_overhead
# (~10 min), input_pipeline (~6 min), loader_step (accelerators only: skipped on a CPU),
# ablation (RESULTS.md's table, written next to the log; about an hour). bench/torch_spcl.py runs inside the
# train_step parts. Every script prints the machine note first (CPU model, usable cores, load before,
# versions, device, date) and the load after last; the timings are medians with their (min–max) over >= 5
# interleaved rounds. Quote a number only from a run whose load before and after stayed well under the usable
# core count. GPU tables: bash bench/gpu.sh.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python}
stamp=$(date -u '+%Y%m%d-%H%M%S')
log=$(realpath -m "${1:-runs/bench-$stamp.log}")
mkdir -p "$(dirname "$log")"
exec > >(tee -a "$log") 2>&1
tee_pid=$!

wanted() {  # wanted NAME: whether BENCH_ONLY / BENCH_SKIP let this part run
  local name=$1
  if [ -n "${BENCH_ONLY:-}" ] && [[ " $BENCH_ONLY " != *" $name "* ]]; then return 1; fi
  if [[ " ${BENCH_SKIP:-} " == *" $name "* ]]; then return 1; fi
  return 0
}

part() {  # part NAME COMMAND...: run one benchmark, timed, its exit status noted; the next one runs regardless
  local name=$1 start status
  shift
  wanted "$name" || { echo; echo "## $name: skipped (BENCH_ONLY / BENCH_SKIP)"; return; }
  echo
  echo "## $name: $*"
  echo
  start=$(date +%s)
  "$@"
  status=$?
  echo "(part $name: exit status $status, $(( $(date +%s) - start )) s wall)"
}

backend=$("$py" -c 'import jax; print(jax.default_backend())' 2>/dev/null || echo unknown)
echo "# spcl_jax benchmarks, bench/all.sh, $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' (with local changes)');" \
     "python: $py; JAX backend: $backend; log: $log"
echo "uptime before: $(uptime)"

part kmeans "$py" -m bench.kmeans
part cpu_conv "$py" -m bench.cpu_conv
part train_step "$py" -m bench.train_step --preset cpu-full --compare-torch interleaved --ynnpack-convs
if [ "$(nproc)" -ge 2 ] && command -v taskset > /dev/null; then
  part train_step_1core env OMP_NUM_THREADS=1 taskset -c "$("$py" -c 'import os; print(max(os.sched_getaffinity(0)))')" \
    "$py" -m bench.train_step --preset cpu-full --compare-torch interleaved --ynnpack-convs
else
  echo; echo "## train_step_1core: skipped (needs taskset and 2 or more usable cores)"
fi
part train_step_narrow "$py" -m bench.train_step --preset cpu --compare-torch interleaved --ynnpack-convs
part cpu_step_profile "$py" -m bench.cpu_step_profile --relu-max
part huge_pages "$py" -m bench.huge_pages --preset digits
part huge_pages_full "$py" -m bench.huge_pages --preset cpu-full --rounds 4
part epoch_overhead "$py" -m bench.epoch_overhead --preset cpu
part input_pipeline "$py" -m bench.input_pipeline --images 512 --batch 64 --workers 1,2 --json
if [ "$backend" = cpu ]; then
  echo; echo "## loader_step: skipped (it times the ResNet-50 step fed by the loader: accelerators only, bench/gpu.sh)"
else
  part loader_step "$py" -m bench.loader_step --preset gpu
fi
part ablation "$py" -m bench.ablation --out "${log%.log}-RESULTS.md"

echo
echo "uptime after: $(uptime)"
echo "log written to $log"
exec >&- 2>&-
wait "$tee_pid"  # the log is complete when the script returns
