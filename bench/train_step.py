"""SPCL train-step throughput of spcl_jax: views/s, XLA-counted TFLOP/s and the fraction of the chip's peak.

    python bench/train_step.py --preset cpu                      # ResNet-18 at 1/16 width, a few seconds
    python bench/train_step.py --preset gpu --compare-torch --out bench_results.md

Times `train.build(...)[0].train_step` (the jitted, donated step: on-device augmentation of the uint8
pairs into 4 views, 4 encoder + 4 projection passes, NT-Xent, prototype CE, siamese metric, LARS) on
one synthetic batch already on the device, after compilation and 2 warm-up steps. Each pair is 4 views.
FLOPs are XLA's cost analysis of the compiled step (augmentation included). ResNet-18 runs with
configs/cifar10.py (CIFAR stem, 32 px), ResNet-50 with configs/imagenet.py (224 px crops of 256 px images).
`--compare-torch` first runs bench/torch_spcl.py (the original's step in PyTorch) on the same rows in a
child process, so that the two frameworks never share the GPU's memory (JAX keeps what it allocates).
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import types

import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench import common  # noqa: E402
from configs import cifar10, imagenet  # noqa: E402
from spcl_jax import sharding, train  # noqa: E402
from spcl_jax.data import ArraySource  # noqa: E402
from spcl_jax.data.datasets import load_size  # noqa: E402

CONFIGS = {"resnet18": cifar10, "resnet50": imagenet}
COMBINED = common.COLUMNS[:4] + [
    ("ms_per_step", "ours ms/step", "{:.1f}"), ("views_per_s", "ours views/s", "{:.0f}"),
    ("tflops", "ours TFLOP/s", "{:.3g}"), ("pct_peak", "ours % peak", "{:.1f}"),
    ("torch_ms_per_step", "original ms/step", "{:.1f}"), ("torch_views_per_s", "original views/s", "{:.0f}"),
    ("torch_tflops", "original TFLOP/s", "{:.3g}"), ("ratio", "ours/original (views/s)", "{:.2f}")]


def config_for(row, width):
    config = CONFIGS[row.model].get_config()
    config.batch_size, config.dtype, config.width_multiplier = row.batch, row.dtype, width
    config.num_prototypes = common.NUM_PROTOTYPES
    return config


def synthetic_batch(config, mesh):
    """Fake splits holding one batch of random uint8 images (at the stored size) and that batch on the device."""
    rng = np.random.default_rng(0)
    size = load_size(config) if config.dataset == "imagenet" else config.image_size
    n = config.batch_size
    pretrain = ArraySource(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                           rng.integers(0, config.num_prototypes, n))
    splits = types.SimpleNamespace(pretrain=pretrain, num_classes=config.n_classes, mean=(0.5,) * 3, std=(0.25,) * 3)
    b = rng.permutation(n)
    batch = dict(images_a=pretrain.get(np.arange(n)), images_b=pretrain.get(b),
                 labels_a=pretrain.labels.astype(np.int32), labels_b=pretrain.labels[b].astype(np.int32),
                 similarity=rng.integers(0, 2, n).astype(np.float32))
    return splits, sharding.to_global(batch, sharding.batch_sharding(mesh))


def xla_flops(compiled):
    cost = compiled.cost_analysis()  # a dict in jax 0.10; older versions return a list with one dict per program
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


def measure(row, width, steps):
    start = time.perf_counter()
    config = config_for(row, width)
    mesh = sharding.data_mesh()
    splits, batch = synthetic_batch(config, mesh)
    setup, state = train.build(config, "spcl", splits, mesh)
    keys = [jax.device_put(k, sharding.replicated(mesh)) for k in jax.random.split(jax.random.key(0), steps + 2)]
    step = setup.train_step.lower(state, batch, keys[0]).compile()
    for key in keys[:2]:  # warm-up
        state, metrics = step(state, batch, key)
    jax.block_until_ready(state)
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    for key in keys[2:]:
        state, metrics = step(state, batch, key)
    jax.block_until_ready((state, metrics))
    seconds = (time.perf_counter() - start) / steps
    return common.result(row, seconds, setup_s, xla_flops(step), jax.devices()[0].device_kind)


def torch_results(preset, steps):
    """bench/torch_spcl.py's results for the same preset, or None when torch is missing or it fails."""
    if importlib.util.find_spec("torch") is None:
        print("torch is not importable (pip install -r bench/requirements.txt): no comparison", flush=True)
        return None
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "torch.json")
        command = [sys.executable, os.path.join(HERE, "torch_spcl.py"), "--preset", preset, "--json", path]
        if subprocess.run(command + (["--steps", str(steps)] if steps else [])).returncode != 0:
            print("bench/torch_spcl.py failed: no comparison", flush=True)
            return None
        with open(path) as f:
            return json.load(f)


def combine(ours, torch):
    spec = lambda r: (r["model"], r["px"], r["dtype"], r["batch"])  # noqa: E731
    theirs = {spec(r): r for r in torch["results"]}
    rows = []
    for r in ours:
        t = theirs.get(spec(r))
        extra = {} if t is None else dict(torch_ms_per_step=t["ms_per_step"], torch_views_per_s=t["views_per_s"],
                                          torch_tflops=t["tflops"], ratio=r["views_per_s"] / t["views_per_s"])
        rows.append(dict(r, **extra))
    return rows


def report(ours, torch, width):
    device = jax.devices()[0]
    lines = ["## SPCL train step", "",
             f"spcl_jax on {device.device_kind} ({jax.default_backend()}, {jax.device_count()} device(s)), "
             f"jax {jax.__version__}; width multiplier {width}; batch = pairs, 4 views each.", "",
             common.markdown(ours), "",
             "ours: the whole jitted step including on-device augmentation of the uint8 pairs; setup s = build + "
             "compile + 2 warm-up steps; TFLOP/s from XLA's cost analysis of the compiled step; % peak against "
             "dense bf16 989 / fp32 67 TFLOP/s (H100 SXM, H200). float32 convolutions may run on TF32 tensor "
             "cores (JAX's default GPU precision), so float32 can pass 100%."]
    if torch is not None:
        lines += ["", "### Against the original's step in PyTorch (bench/torch_spcl.py)", "",
                  common.markdown(combine(ours, torch), COMBINED), "", torch["note"],
                  "The comparison is conservative for us: our time includes augmentation, theirs does not."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(common.PRESETS), default="cpu")
    parser.add_argument("--steps", type=int, help="timed steps per row (default: the preset's)")
    parser.add_argument("--compare-torch", action="store_true", help="also run bench/torch_spcl.py and compare")
    parser.add_argument("--out", help="also write the tables (markdown) to this file, rewritten after every row")
    args = parser.parse_args()
    preset = common.PRESETS[args.preset]
    torch = torch_results(args.preset, args.steps) if args.compare_torch else None  # before JAX takes the GPU
    ours = []
    for row in preset["rows"]:
        try:
            ours.append(measure(row, preset["width"], args.steps or preset["steps"]))
        except jax.errors.JaxRuntimeError as e:  # e.g. out of memory: report and go on with the next row
            print(f"ours {row}: failed: {str(e).splitlines()[0]}", flush=True)
            continue
        print(f"ours {row}: {ours[-1]['ms_per_step']:.1f} ms/step", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write(report(ours, torch, preset["width"]))
    print(report(ours, torch, preset["width"]))


if __name__ == "__main__":
    main()
