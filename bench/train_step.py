"""SPCL train-step throughput of spcl_jax: views/s, XLA-counted TFLOP/s and the fraction of the chip's peak.

    python -m bench.train_step --preset cpu                      # ResNet-18 at 1/16 width, about a minute
    python -m bench.train_step --preset cpu-full --compare-torch interleaved --ynnpack-convs   # the CPU gap
    python -m bench.train_step --preset gpu --compare-torch --out bench_results.md

Times `train.build(...)[0].train_step` (the jitted, donated step: on-device augmentation of the uint8
pairs into 4 views, 4 encoder + 4 projection passes, NT-Xent, prototype CE, siamese metric, LARS) on
one synthetic batch already on the device, after compilation and 2 warm-up steps: median (min–max) of
--steps rounds (>= 5 by default), in which every timed method runs one step, taking turns (bench/common.py
`interleaved`). Each pair is 4 views. FLOPs are XLA's cost analysis of the compiled step (augmentation
included). ResNet-18 runs with configs/cifar10.py (CIFAR stem, 32 px), ResNet-50 with configs/imagenet.py
(224 px crops of 256 px images). `--compare-torch` first runs bench/torch_spcl.py (the original's step in
PyTorch) on the same rows in a child process, so that the two frameworks never share the GPU's memory (JAX
keeps what it allocates); `--compare-torch interleaved` (for CPUs) runs both in this process, one step of
each in turn, so that load from other jobs hits both alike. `--ynnpack-convs` also times our step compiled
with jaxlib 0.10's default CPU convolutions (YNNPACK; spcl_jax.runtime.configure() turns them off), in turn too.
"ours/original" is the ratio of views/s (= original's median step time / ours; >1 = ours faster) with the
range of the per-round ratios when interleaved, or the widest range of the two series when the original ran
in a child process. The output starts with the machine note (CPU, cores, load, versions, device) and ends
with the load after.
"""
import argparse
import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from configs import cifar10, imagenet
from spcl_jax import epoch_batches, runtime, sharding, train
from spcl_jax.data import ArraySource
from spcl_jax.data.datasets import load_size
from spcl_jax.data.decode import canvas_shape
from spcl_jax.method import METHODS

HERE = os.path.dirname(os.path.abspath(__file__))

CONFIGS = {"resnet18": cifar10, "resnet50": imagenet}
COMBINED = common.COLUMNS[:4] + [
    ("ms_spread", f"ours ms/step, {common.SPREAD}", "{}"), ("views_per_s", "ours views/s", "{:.0f}"),
    ("tflops", "ours TFLOP/s", "{:.3g}"), ("pct_peak", "ours % peak", "{:.1f}"),
    ("torch_ms_spread", f"original ms/step, {common.SPREAD}", "{}"),
    ("torch_views_per_s", "original views/s", "{:.0f}"), ("torch_tflops", "original TFLOP/s", "{:.3g}"),
    ("ratio_cell", "ours/original (views/s), ratio of medians (range)", "{}")]
YNNPACK_COLUMNS = [("ynnpack_ms_spread", f"ms/step, convolutions on YNNPACK, {common.SPREAD}", "{}"),
                   ("ynnpack_ratio_cell", "ours/original, convolutions on YNNPACK (range)", "{}")]
# In the first table: our step with YNNPACK convolutions against ours (time ratio, >1 = ours faster).
OURS_YNNPACK_COLUMNS = YNNPACK_COLUMNS[:1] + [
    ("ynnpack_over_ours_cell", "YNNPACK convolutions / ours (time), ratio of medians (range)", "{}")]


def config_for(row, width, num_prototypes=common.NUM_PROTOTYPES):
    config = CONFIGS[row.model].get_config()
    config.batch_size, config.dtype, config.width_multiplier, config.image_size = row.batch, row.dtype, width, row.px
    config.num_prototypes = num_prototypes
    return config


def synthetic_splits(config, n, seed=0):
    """Fake splits whose pretrain set holds n random uint8 images with random labels, in the canvas that
    images of the dataset arrive in (ImageNet: a 256 x 384 canvas, each image filling it)."""
    rng = np.random.default_rng(seed)
    canvas = canvas_shape(load_size(config.image_size)) if config.dataset == "imagenet" else (config.image_size,) * 2
    pretrain = ArraySource(rng.integers(0, 256, (n, *canvas, 3), dtype=np.uint8),
                           rng.integers(0, config.n_classes, n))
    return types.SimpleNamespace(pretrain=pretrain, num_classes=config.n_classes, mean=(0.5,) * 3, std=(0.25,) * 3)


@functools.lru_cache(maxsize=1)
def _build(row, width, num_prototypes, mesh):
    config = config_for(row, width, num_prototypes)
    splits = synthetic_splits(config, config.batch_size)
    rng = np.random.default_rng(1)
    n = config.batch_size
    plan = {"a": np.arange(n)[None], "b": rng.permutation(n)[None], "similarity": rng.integers(0, 2, (1, n))}
    setup, state = train.build(config, METHODS["spcl"], splits, mesh)
    return setup, state, epoch_batches.load_batch(setup, 0, plan, 0, rng.integers(0, num_prototypes, n))


def build_step(row, width, num_prototypes, mesh):
    """(setup, state, batch): `train.build` of SPCL on fake splits of one batch, and that batch on the device.

    The last build is kept (the state is handed out as a copy: the step donates it), so that scripts run in
    one process, as tests/test_bench.py runs them, share one traced and compiled step.
    """
    setup, state, batch = _build(row, width, num_prototypes, mesh)
    return setup, jax.tree.map(jnp.copy, state), batch


def xla_flops(compiled):
    cost = compiled.cost_analysis()  # a dict in jax 0.10; older versions return a list with one dict per program
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


def prepare(row, width, num_prototypes, compiler_options=None):
    """(one step run to completion, setup seconds: build + compile + 2 warm-up steps, XLA's FLOPs of a step);
    with `compiler_options`, of the step compiled with these XLA options."""
    start = time.perf_counter()
    mesh = sharding.data_mesh()
    setup, state, batch = build_step(row, width, num_prototypes, mesh)
    step = setup.train_step
    if compiler_options is not None:
        step = step.lower(state, batch).compile(compiler_options=compiler_options)

    def run():
        nonlocal state
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))

    run()  # compiles
    run()
    compiled = step if compiler_options is not None else step.lower(state, batch).compile()  # (cached)
    return run, time.perf_counter() - start, xla_flops(compiled)


def measure(row, width, steps, num_prototypes, *, ynnpack=False, torch_too=False):
    """{name: result} of one row: "ours" and, if asked, "ynnpack" (ours with jaxlib 0.10's CPU default of
    convolutions on YNNPACK) and "theirs" (bench/torch_spcl.py on the CPU), all in this process taking turns."""
    runs = {"ours": prepare(row, width, num_prototypes)}
    if ynnpack:
        runs["ynnpack"] = prepare(row, width, num_prototypes, common.YNNPACK_DEFAULT)
    if torch_too:
        import torch

        from bench import torch_spcl

        runs["theirs"] = torch_spcl.prepare(row, width, torch.device("cpu"), num_prototypes)
    seconds = common.interleaved({name: run[0] for name, run in runs.items()}, steps, warmup=0)  # prepare warmed up
    return {name: common.result(row, seconds[name], setup_s, flops,
                                "cpu" if name == "theirs" else jax.devices()[0].device_kind)
            for name, (_, setup_s, flops) in runs.items()}


def torch_results(args):
    """bench/torch_spcl.py's results for the same sizes from a child process, or None when it fails."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "torch.json")
        command = [sys.executable, "-m", "bench.torch_spcl", "--json", path] + common.size_argv(args)
        if subprocess.run(command, cwd=os.path.dirname(HERE)).returncode != 0:
            print("bench/torch_spcl.py failed: no comparison", flush=True)
            return None
        with open(path) as f:
            torch = json.load(f)
    torch["note"] += (" Ran in a child process before ours (not interleaved): the ratio's range is the widest the "
                      "two series allow, min/max to max/min.")
    return torch


def combine(ours, torch):
    """Our rows with the original's columns and the ratios ours/original of views/s (of equal batches: the
    original's step time over ours), ranges per round when `torch["paired"]` (interleaved in this process)."""
    spec = lambda r: (r["model"], r["px"], r["dtype"], r["batch"])  # noqa: E731
    theirs = {spec(r): r for r in torch["results"]}
    paired = torch.get("paired", False)
    rows = []
    for r in ours:
        t = theirs.get(spec(r))
        extra = {}
        if t is not None:
            middle, low, high = common.ratio(t["seconds"], r["seconds"], paired)
            extra = dict(torch_ms_per_step=t["ms_per_step"], torch_ms_spread=t["ms_spread"],
                         torch_views_per_s=t["views_per_s"], torch_tflops=t["tflops"], ratio=middle,
                         ratio_range=(low, high), ratio_cell=common.ratio_cell(t["seconds"], r["seconds"], paired))
            if "ynnpack_seconds" in r:
                extra["ynnpack_ratio"] = common.ratio(t["seconds"], r["ynnpack_seconds"], paired)[0]
                extra["ynnpack_ratio_cell"] = common.ratio_cell(t["seconds"], r["ynnpack_seconds"], paired)
        rows.append(dict(r, **extra))
    return rows


def ynnpack_columns(ours, columns):
    """The YNNPACK columns when the rows have them (--ynnpack-convs)."""
    return columns if any("ynnpack_ms_per_step" in r for r in ours) else []


def report(ours, torch, width, note, done=False):
    device = jax.devices()[0]
    lines = ["## SPCL train step", "", "```", note, "```", "",
             f"spcl_jax on {device.device_kind} ({jax.default_backend()}, {jax.device_count()} device(s)), "
             f"jax {jax.__version__}; width multiplier {width}; batch = pairs, 4 views each; precision = the dtype "
             f"column (compute dtype; parameters float32); {common.load_note()}.",
             "", common.markdown(ours, common.COLUMNS + ynnpack_columns(ours, OURS_YNNPACK_COLUMNS)), "",
             "ours: the whole jitted step including on-device augmentation of the uint8 pairs; "
             f"{common.SPREAD} of the rounds (one step each, the methods taking turns); "
             "setup s = build + compile + 2 warm-up steps; TFLOP/s from XLA's cost analysis of the compiled step; "
             "% peak against dense bf16 989 / fp32 67 TFLOP/s (H100 SXM, H200). float32 convolutions may run on "
             "TF32 tensor cores (JAX's default GPU precision), so float32 can pass 100%."]
    if torch is not None:
        lines += ["", "### Against the original's step in PyTorch (bench/torch_spcl.py)", "",
                  common.markdown(combine(ours, torch), COMBINED + ynnpack_columns(ours, YNNPACK_COLUMNS)), "",
                  torch["note"],
                  "The comparison is conservative for us: our time includes augmentation, theirs does not."]
    if done:
        lines += ["", common.load_after()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    runtime.configure()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_size_flags(parser)
    parser.add_argument("--compare-torch", nargs="?", const="process", choices=["process", "interleaved"],
                        help="also time bench/torch_spcl.py: in a child process first (GPUs), or interleaved "
                             "step by step in this process (CPUs)")
    parser.add_argument("--ynnpack-convs", action="store_true",
                        help="also time our step with convolutions on YNNPACK (jaxlib 0.10's CPU default, which "
                             "spcl_jax turns off), taking turns with the others")
    parser.add_argument("--out", help="also write the tables (markdown) to this file, rewritten after every row")
    args = parser.parse_args(argv)
    width, steps, rows = common.sizes(args)
    mode = args.compare_torch
    if mode and importlib.util.find_spec("torch") is None:
        print("torch is not importable (pip install -r bench/requirements.txt): no comparison", flush=True)
        mode = None
    note = common.machine_note("child" if mode == "process" else "jax")  # "child": JAX must leave the GPU to torch
    print(note, flush=True)
    torch = torch_results(args) if mode == "process" else None  # before JAX takes the GPU
    theirs = []
    ours = []
    for row in rows:
        try:
            results = measure(row, width, steps, args.num_prototypes, ynnpack=args.ynnpack_convs,
                              torch_too=mode == "interleaved")
        except jax.errors.JaxRuntimeError as e:  # e.g. out of memory: report and go on with the next row
            print(f"ours {row}: failed: {str(e).splitlines()[0]}", flush=True)
            continue
        result = results["ours"]
        if "ynnpack" in results:
            result.update(ynnpack_ms_per_step=results["ynnpack"]["ms_per_step"],
                          ynnpack_ms_spread=results["ynnpack"]["ms_spread"],
                          ynnpack_views_per_s=results["ynnpack"]["views_per_s"],
                          ynnpack_seconds=results["ynnpack"]["seconds"],
                          ynnpack_over_ours_cell=common.ratio_cell(results["ynnpack"]["seconds"], result["seconds"]))
        ours.append(result)
        print(f"ours {row}: {result['ms_spread']} ms/step", flush=True)
        if "theirs" in results:
            from bench import torch_spcl

            theirs.append(results["theirs"])
            torch = dict(results=theirs, paired=True, note=torch_spcl.note() + " Timed in the same process as ours, "
                         "one step of each in turn; the ratio's range is that of the per-round ratios.")
        common.save(args.out, report(ours, torch, width, note))
    common.save(args.out, report(ours, torch, width, note, done=True))
    print(report(ours, torch, width, note, done=True))


if __name__ == "__main__":
    main()
