"""Device memory of the SPCL train step from XLA's memory analysis, and the largest batch that fits, with and
without rematerialised residual blocks (`--config.remat=block`).

    python -m bench.memory                       # ResNet-50, 224 px, bfloat16 (configs/imagenet.py), 3-6 min on a CPU
    python -m bench.memory --model resnet18 --px 32 --width 0.0625 --batches 2,4   # a smoke run

Compiles (does not run) the jitted, donated train step of configs/imagenet.py (ResNet-18: configs/cifar10.py)
on one device for two batch sizes and reads `compiled.memory_analysis()`: arguments + outputs + temporaries -
aliased (donated) bytes. Per pair = the difference between the two batches over their difference; fixed = the
rest (parameters, optimiser state, code). The largest pairs per device = (device memory - fixed) / per pair,
for the memory sizes given (80 GiB H100, 141 GiB H200). XLA's analysis on the CPU backend stands in for the
GPU's (same program, other fusion and layout choices: a guide, not a guarantee).
"""
import argparse
import time

import jax
import numpy as np

from bench import common
from bench.train_step import config_for, synthetic_splits
from spcl_jax import runtime, train
from spcl_jax.method import METHODS

COLUMNS = [("remat", "remat", "{}"), ("model", "model", "{}"), ("px", "px", "{}"), ("dtype", "dtype", "{}"),
           ("per_pair_mib", "MiB per pair", "{:.1f}"), ("fixed_gib", "fixed GiB", "{:.2f}"),
           ("compile_s", "compile s", "{:.1f}")]
GIB = 1 << 30


def step_bytes(config, batch):
    """(bytes the compiled step needs on its device, compile seconds) for `batch` pairs."""
    config = config.copy_and_resolve_references()
    config.batch_size = batch
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    splits = synthetic_splits(config, batch)
    setup, state = train.build(config, METHODS["spcl"], splits, mesh)
    rng = np.random.default_rng(0)
    plan = {"a": np.arange(batch)[None], "b": rng.permutation(batch)[None], "similarity": rng.integers(0, 2, (1, batch))}
    host = train.epoch_pass(setup, 0, plan)(0)
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in host.items()}
    abstract.update(labels_a=jax.ShapeDtypeStruct((batch,), np.int32), labels_b=jax.ShapeDtypeStruct((batch,), np.int32),
                    similarity=jax.ShapeDtypeStruct((batch,), np.float32))
    start = time.perf_counter()
    analysis = setup.train_step.lower(state, abstract).compile().memory_analysis()
    seconds = time.perf_counter() - start
    total = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
             - analysis.alias_size_in_bytes)
    return total, seconds


def measure(row, width, batches, remat):
    config = config_for(row, width)
    config.remat = remat
    (small, small_s), (large, large_s) = (step_bytes(config, b) for b in batches)
    per_pair = (large - small) / (batches[1] - batches[0])
    return dict(remat=remat, model=row.model, px=row.px, dtype=row.dtype, per_pair_mib=per_pair / (1 << 20),
                fixed_gib=(small - batches[0] * per_pair) / GIB, compile_s=small_s + large_s,
                per_pair=per_pair, fixed=small - batches[0] * per_pair)


def main(argv=None):
    runtime.configure()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("resnet18", "resnet50"), default="resnet50")
    parser.add_argument("--px", type=common.positive(int), default=224)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--width", type=common.positive(float), default=1.0)
    parser.add_argument("--batches", type=common.positive_ints, default="8,16", help="two batch sizes (pairs)")
    parser.add_argument("--remat", default="none,block", help="comma-separated remat modes to compare")
    parser.add_argument("--device-gib", type=common.positive_ints, default="80,141",
                        help="device memory sizes (GiB) to fit")
    args = parser.parse_args(argv)
    if len(args.batches) != 2 or args.batches[0] >= args.batches[1]:
        parser.error(f"--batches {args.batches}: give two increasing batch sizes")
    print(common.machine_note(), flush=True)
    print(f"{args.model} at {args.px} px, {args.dtype} compute (parameters float32), width {args.width}, batches "
          f"{args.batches[0]} and {args.batches[1]} pairs; remat {args.remat}; compiled, not run", flush=True)
    row = common.Row(args.model, args.px, args.dtype, args.batches[0])
    results = [measure(row, args.width, args.batches, remat) for remat in args.remat.split(",")]
    columns = COLUMNS + [(f"fit_{g}", f"max pairs / {g} GiB device", "{:,.0f}") for g in args.device_gib]
    for r in results:
        for g in args.device_gib:
            r[f"fit_{g}"] = max((g * GIB - r["fixed"]) / r["per_pair"], 0.0)
    print(common.markdown(results, columns))
    print(common.load_after())


if __name__ == "__main__":
    main()
