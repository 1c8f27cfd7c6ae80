"""Where our SPCL train step spends its time on a CPU: XLA's own per-operation trace, grouped by kind.

    python -m bench.cpu_step_profile                   # full-width ResNet-18 at 32 px, 32 pairs (the cpu-full row)
    python -m bench.cpu_step_profile --preset cpu      # width 1/16, 16 pairs (--width, --batch, --steps: sizes)
    python -m bench.cpu_step_profile --relu-max        # also time the step with relu as jnp.maximum, in turns

Runs the step of bench/train_step.py (`prepare`: built, compiled, warmed up), records as many steps as it
times (--steps, the preset's 5 by default) with `jax.profiler` and sums the duration of every XLA:CPU
operation event per step over the worker threads, grouped by kind (the fusion or thunk name without its number: transpose_copy_fusion, ynn_fusion, ...).
Convolutions run asynchronously in Eigen's thread pool: their own work does not appear in the events, so
"step minus operations / threads" bounds what they take. --relu-max rebuilds the step with
`spcl_jax.models.resnet.relu` as jnp.maximum, which XLA:CPU recomputes inside the weight-gradient
transposes (the `transpose_copy_fusion` row), and times both steps in interleaved rounds.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import tempfile

import jax
import jax.numpy as jnp

from bench import common, train_step
from spcl_jax import runtime
from spcl_jax.models import resnet

WORKER_THREAD = "tf_XLAEigen"  # XLA:CPU's worker threads in the trace; the thunk executor's own events are skipped


def operation_times(trace_path, steps):
    """{kind: (ms per step summed over worker threads, events per step)} of a perfetto trace (.json.gz)."""
    with gzip.open(trace_path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    totals = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("ph") != "X" or not threads.get((e["pid"], e["tid"]), "").startswith(WORKER_THREAD):
            continue
        if e["name"].startswith(("ThunkExecutor", "end: ", "Wait", "Rendezvous")):  # scheduling, not work
            continue
        kind = re.sub(r"\.\d+$", "", e["name"])
        totals[kind][0] += e["dur"] / 1000 / steps
        totals[kind][1] += 1
    return {kind: (ms, count / steps) for kind, (ms, count) in totals.items()}


def profile(run, steps):
    with tempfile.TemporaryDirectory() as directory:
        jax.profiler.start_trace(directory, create_perfetto_trace=True)
        for _ in range(steps):
            run()
        jax.profiler.stop_trace()
        [trace] = glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)
        return operation_times(trace, steps)


def main(argv=None):
    runtime.configure()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_size_flags(parser)
    parser.set_defaults(preset="cpu-full")
    parser.add_argument("--top", type=common.positive(int), default=12, help="operation kinds listed")
    parser.add_argument("--relu-max", action="store_true", help="also time the step with relu as jnp.maximum")
    args = parser.parse_args(argv)
    width, steps, [row] = common.sizes(args)
    print(common.machine_note(), flush=True)
    runs = {"ours": train_step.prepare(row, width, args.num_prototypes)[0]}
    if args.relu_max:
        select = resnet.relu
        resnet.relu = lambda x: jnp.maximum(x, 0)
        try:
            train_step._build.cache_clear()
            runs["relu as jnp.maximum"] = train_step.prepare(row, width, args.num_prototypes)[0]
        finally:
            resnet.relu = select
            train_step._build.cache_clear()
    seconds = common.interleaved(runs, steps, warmup=0)
    ops = profile(runs["ours"], steps)
    step_ms = 1000 * statistics.median(seconds["ours"])
    busy = sum(ms for ms, _ in ops.values())
    print(f"\n{row}, width {width}: step {common.spread(seconds['ours'], 1000)} ms over {steps} "
          f"rounds; XLA operations (convolutions excluded, see the docstring) {busy:.0f} ms per step summed over "
          f"the worker threads")
    for name, times in seconds.items():
        if name != "ours":
            print(f"{name}: {common.spread(times, 1000)} ms per step, "
                  f"{statistics.median(times) / statistics.median(seconds['ours']):.2f}x ours (ratio of medians)")
    threads = len(os.sched_getaffinity(0))  # XLA:CPU's worker threads: one per usable core
    print(f"\n| operation kind | ms per step (all threads) | share of step time x {threads} threads | events per step |")
    print("|---|---|---|---|")
    for kind, (ms, count) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"| {kind} | {ms:.1f} | {ms / (step_ms * threads):.1%} | {count:.0f} |")
    print("\n" + common.load_after())


if __name__ == "__main__":
    main()
