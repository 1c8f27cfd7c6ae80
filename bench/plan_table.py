"""BENCHMARKS.md's planning table: `python -m spcl_jax.plan` for each (config, target) row, one after the other,
each plan's whole output kept in a log directory, then one markdown table.

    python -m bench.plan_table                       # every row (about an hour on 2 cores)
    python -m bench.plan_table --rows imagenet:v5e-64,cifar10:h100x8 --quick
    PYTHONPATH=.ci/gpu-route python -m bench.plan_table   # where the CUDA plugin lives outside the environment

A row is `config:target` (configs/<config>.py); `+` after it (`imagenet:v5e-64+`) plans it in full: the largest
global batch with and without remat=block, by compiles. Columns: GiB per device and fit of the training step at the
config's batch, TFLOP per step (all devices), the least step, epoch and 1000-epoch run times (lower bounds from
peak rates), the host images/s at that speed, the largest batch found (full rows) and how long planning took.
The compile times are the planner's (2 compiles at a time): they depend on the machine and its load, the rest
does not.
"""
import argparse
import json
import os
import subprocess
import sys
import time

from bench import common

ROWS = ("imagenet:v5e-64+ imagenet:v5e-256 imagenet:v4-32 imagenet:v5p-128 imagenet:v6e-64 imagenet:h100x8+ "
        "imagenet:a100-80x8 imagenet:h200x8 cifar10:v5e-8 cifar10:h100x8").split()
COLUMNS = [("config", "config", "{}"), ("target", "target", "{}"), ("batch", "global batch", "{:,}"),
           ("gib", "GiB per device", "{:.2f}"), ("fits", "fits", "{}"), ("tflop", "TFLOP per step", "{:.3g}"),
           ("step", "least step", "{}"), ("epoch", "least epoch", "{}"), ("run", "least 1000-epoch run", "{}"),
           ("images", "host images/s", "{:,.0f}"), ("max_none", "largest batch, remat=none", "{}"),
           ("max_block", "largest batch, remat=block", "{}"), ("minutes", "planning min", "{:.1f}")]


def plan(row, quick, log_dir):
    """The JSON summary of one row's plan (its output kept in log_dir) and the minutes it took."""
    config, target = row.rstrip("+").split(":")
    full = row.endswith("+") and not quick
    command = [sys.executable, "-m", "spcl_jax.plan", "--config", f"configs/{config}.py", "--target", target,
               "--json"] + ([] if full else ["--quick"])
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    minutes = (time.perf_counter() - start) / 60
    name = row.replace(":", "_").replace("+", "_full")
    with open(os.path.join(log_dir, f"{name}.md"), "w") as f:
        f.write(f"$ {' '.join(command[1:])}\n\n{done.stdout}\n\n{done.stderr[-20000:]}")
    if done.returncode:
        return None, minutes, done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
    return json.loads(done.stdout.strip().splitlines()[-1]), minutes, None


def table_row(row, summary, minutes, error):
    from spcl_jax.plan.report import seconds_text

    config, target = row.rstrip("+").split(":")
    if summary is None:
        return dict(config=config, target=target, fits=f"planning failed: {error}", minutes=minutes)
    step = summary["programs"]["train_step"]
    maxima = summary["max_global_batch"] or {}
    return dict(config=config, target=target, batch=summary["config"]["global_batch"],
                gib=step["bytes_per_device"] / 2**30, fits="yes" if step["fits"] else "**no**",
                tflop=step["flops_per_device"] * summary["devices"] / 1e12,
                step=seconds_text(summary["least_step_seconds"]), epoch=seconds_text(summary["least_epoch_seconds"]),
                run=seconds_text(summary["least_run_seconds"] / summary["config"]["n_epochs"] * 1000),
                images=summary["host_images_per_second"], max_none=maxima.get("none", "–"),
                max_block=maxima.get("block", "–"), minutes=minutes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated config:target[+] rows")
    parser.add_argument("--quick", action="store_true", help="plan every row with --quick")
    parser.add_argument("--log-dir", default=None, help="where each plan's output goes (default: runs/plans-<time>)")
    args = parser.parse_args(argv)
    log_dir = args.log_dir or os.path.join("runs", f"plans-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    os.makedirs(log_dir, exist_ok=True)
    print(common.machine_note(), flush=True)
    rows = []
    for row in args.rows.split(","):
        summary, minutes, error = plan(row, args.quick, log_dir)
        rows.append(table_row(row, summary, minutes, error))
        print(f"{row}: {'done' if summary else error} in {minutes:.1f} min", flush=True)
    print(common.markdown(rows, COLUMNS))
    print(f"each plan's output: {log_dir}")
    print(common.load_after())


if __name__ == "__main__":
    main()
