"""Our CPU train step with XLA's temporaries in 4 KiB pages (as always) and in transparent huge pages.

    python -m bench.huge_pages --preset digits          # the demo's step (126 MiB of temporaries), 5 rounds
    python -m bench.huge_pages --preset cpu-full        # full-width ResNet-18 (the `cpu` preset's temporaries
                                                        # stay under malloc's 32 MiB mmap threshold: no change)

XLA:CPU maps a fresh buffer for each execution's temporaries (above glibc's 32 MiB mmap threshold) and the
kernel faults it in page by page, zeroing each page: the minor page faults and kernel CPU time below. glibc's
malloc can ask for transparent huge pages instead (GLIBC_TUNABLES=glibc.malloc.hugetlb=1), a setting read only
at start-up (launch.py would have to restart itself), so each round runs the step in two child processes, one
per setting, taking turns (the order rotates every round); each child builds and compiles the step, warms it
up and times --steps steps. Per setting: the median (min–max) over the rounds of each child's median ms per
step, minor page faults and kernel (system) CPU ms per step. Only differs where the kernel's THP mode is
`madvise` (printed); under `always` both get huge pages, under `never` neither.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from bench import common

THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
SETTINGS = {"4 KiB pages (hugetlb=0)": "glibc.malloc.hugetlb=0", "huge pages (hugetlb=1)": "glibc.malloc.hugetlb=1"}


def child(args):
    """Times the step in this process: JSON {ms, faults, sys_ms} per step, medians over --steps."""
    from bench import train_step
    from spcl_jax import runtime

    runtime.configure()
    width, steps, [row] = common.sizes(args)
    run = train_step.prepare(row, width, args.num_prototypes)[0]
    ms, faults, sys_ms = [], [], []
    for _ in range(steps):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        run()
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        ms.append(1000 * wall)
        faults.append(after.ru_minflt - before.ru_minflt)
        sys_ms.append(1000 * (after.ru_stime - before.ru_stime))
    print(json.dumps({k: statistics.median(v) for k, v in (("ms", ms), ("faults", faults), ("sys_ms", sys_ms))}))


def thp_mode():
    try:
        with open(THP_MODE_FILE) as f:
            return f.read().strip()
    except OSError:
        return "unknown (no THP on this kernel)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_size_flags(parser)
    parser.set_defaults(preset="digits")
    parser.add_argument("--rounds", type=common.positive(int), default=5, help="child processes per setting")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    print(common.machine_note(), flush=True)
    print(f"kernel THP mode: {thp_mode()}", flush=True)
    names = list(SETTINGS)
    results = {name: [] for name in names}
    command = [sys.executable, "-m", "bench.huge_pages", "--child", *common.size_argv(args)]
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            env = dict(os.environ, GLIBC_TUNABLES=SETTINGS[name])
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
    width, steps, [row] = common.sizes(args)
    print(f"\n{row.model} at width {width}, {row.batch} pairs, {row.dtype}; {args.rounds} rounds, each child "
          f"timing {steps} steps after compiling and 2 warm-up steps; {common.SPREAD} over the rounds\n")
    print("| setting | ms/step | minor page faults/step | kernel CPU ms/step |")
    print("|---|---|---|---|")
    for name in names:
        cells = [common.spread([r[key] for r in results[name]], fmt=fmt)
                 for key, fmt in (("ms", "{:.1f}"), ("faults", "{:.0f}"), ("sys_ms", "{:.1f}"))]
        print(f"| {name} | {' | '.join(cells)} |")
    small, huge = ([r["ms"] for r in results[name]] for name in names)
    print(f"\n4 KiB / huge pages (time): {common.ratio_cell(small, huge)} (>1: huge pages faster; paired by round)")
    print("\n" + common.load_after())


if __name__ == "__main__":
    main()
