"""One SPCL epoch: time in training steps against the feature pass, k-means and pair planning, and their growth.

    python -m bench.epoch_overhead --preset cpu   # ResNet-18 at 1/16 width, N 1,024-8,192, K 128-1,024, 2-4 min
    python -m bench.epoch_overhead --preset gpu   # CIFAR-10 scale: 50,000 images of 32 px, ResNet-18, K=512,
                                                  # batch 512 pairs, bfloat16; N 12,500-100,000, K 128-2,048

Everything runs through the library on synthetic data (random uint8 images, random labels): `train.cluster`
(feature pass, PCA-whitening, k-means, pseudo labels and their statistics), `train.epoch_plan` (member table
and pair plan) and `train.run_epoch` (host loader, the jitted step, metrics), plus the feature pass
(`features.extract_features`) and PCA + k-means (`kmeans.preprocess_features`, `kmeans.kmeans`) on their own.
One network is built (bench/train_step.py's `build_step`, K0 prototypes); each row reuses it on the first N
images with K prototypes. The training steps are timed with one real epoch at the reference (N0, K0) and
given as steps x that epoch's seconds per step elsewhere: N changes only the number of steps, K only the
prototype classifier's width. Times are warm (after a call that compiled; the feature pass: the faster of
two); k-means compile s is its first call minus its second, paid once per (N, K) in a run.
epoch = cluster + planning + steps; overhead = (cluster + planning) / epoch.
"""
import argparse
import dataclasses
import math
import time
import types

import jax
import numpy as np

from bench import common
from bench.train_step import build_step, synthetic_splits
from spcl_jax import features, kmeans, runtime, sharding, train
from spcl_jax.data import ArraySource
from spcl_jax.metrics import MetricWriter

PRESETS = {
    "cpu": dict(row=common.Row("resnet18", 32, "float32", 64), width=0.0625, n0=4096, k0=512,
                sizes=(1024, 2048, 4096, 8192), ks=(128, 512, 1024)),
    "gpu": dict(row=common.Row("resnet18", 32, "bfloat16", 512), width=1.0, n0=50000, k0=512,
                sizes=(12500, 25000, 50000, 100000), ks=(128, 512, 2048)),
}
COLUMNS = [("n", "N", "{:,}"), ("k", "K", "{:,}"), ("steps", "steps", "{}"), ("steps_s", "train steps s", "{:.2f}"),
           ("features_s", "feature pass s", "{:.2f}"), ("kmeans_s", "PCA + k-means s", "{:.2f}"),
           ("kmeans_compile_s", "k-means compile s", "{:.1f}"), ("plan_s", "pair planning s", "{:.3f}"),
           ("cluster_s", "train.cluster s", "{:.2f}"), ("epoch_s", "epoch s", "{:.2f}"),
           ("overhead_pct", "overhead %", "{:.1f}"), ("steps_timing", "steps timed by", "{}")]
# What grows with N and K: (result key, name in the growth lines).
PARTS = [("features_s", "feature pass"), ("kmeans_s", "PCA + k-means"), ("plan_s", "planning"),
         ("cluster_s", "train.cluster")]


def timed(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def for_row(setup, images, labels, n, k):
    """The built setup on the first n images with k prototypes (its jitted functions do not depend on N or K)."""
    config = setup.config.copy_and_resolve_references()
    config.num_prototypes = k
    source = ArraySource(images[:n], labels[:n])
    splits = types.SimpleNamespace(**dict(vars(setup.splits), pretrain=source))
    return dataclasses.replace(setup, config=config, splits=splits, steps_per_epoch=n // config.batch_size)


def feature_pass(setup, state, seed):
    """What `train.cluster` runs first: the frozen encoder over the pretrain set in dataset order."""
    encode = lambda batch: setup.encode(state["params"], state["batch_stats"], batch)  # noqa: E731
    source = setup.splits.pretrain
    maker = features.feature_pass(source, np.arange(len(source)), setup.config.batch_size,
                                  train.FEATURE_VIEWS[setup.config.cluster_feature_view], setup.recipe, seed)
    return features.extract_features(encode, maker, setup.mesh)


def pca_kmeans(setup, feats, position, key):
    """What `train.cluster` runs next: PCA-whitening and k-means of the valid rows."""
    config = setup.config
    valid = sharding.to_global(sharding.host_slice(position < len(setup.splits.pretrain)),
                               sharding.batch_sharding(setup.mesh))
    x = kmeans.preprocess_features(feats, config.pca_dim, valid=valid, eigen_floor=config.pca_eigen_floor).features
    return kmeans.kmeans(x, config.num_prototypes, config.kmeans_iters, key, init=config.kmeans_init, valid=valid)


def real_epoch(setup, state, pseudo):
    """(state, seconds) of `train.run_epoch`, after one step that compiled the train step."""
    warm_up = train.load_batch(setup, 0, train.epoch_plan(setup, 0, pseudo), 0, pseudo)
    state = jax.block_until_ready(setup.train_step(state, warm_up)[0])
    no_checkpoints = types.SimpleNamespace(stop_requested=lambda **_: False, facts={})  # checkpoint_every_steps is 0
    loop = train.Loop(setup, MetricWriter("", enabled=False), no_checkpoints, "")
    (state, _), seconds = timed(lambda: train.run_epoch(loop, state, pseudo, 0, 0))
    return state, seconds


def measure(setup, state, images, labels, n, k, key, first):
    """(the row's setup, its pseudo labels, its table row without the step columns) of (n, k)."""
    setup = for_row(setup, images, labels, n, k)
    kmeans_key, cluster_key = jax.random.split(key)
    feature_pass(setup, state, (n, k))  # compiles the encoder (first row) and the buffer writes (new N)
    (feats, position), features_s = min((timed(lambda: feature_pass(setup, state, (n, k))) for _ in range(2)),
                                        key=lambda out: out[1])
    _, first_s = timed(lambda: pca_kmeans(setup, feats, position, kmeans_key))
    _, kmeans_s = timed(lambda: pca_kmeans(setup, feats, position, kmeans_key))
    if first:  # once per run: what train.cluster uses besides the above (key splits, the statistics' imports)
        train.cluster(setup, state, 0, cluster_key)
    (pseudo, _, _), cluster_s = timed(lambda: train.cluster(setup, state, 0, cluster_key))
    _, plan_s = timed(lambda: train.epoch_plan(setup, 0, pseudo))
    row = dict(n=n, k=k, steps=setup.steps_per_epoch, features_s=features_s, kmeans_s=kmeans_s,
               kmeans_compile_s=max(first_s - kmeans_s, 0.0), plan_s=plan_s, cluster_s=cluster_s)
    return setup, pseudo, row


def with_steps(row, steps_s, timing):
    epoch_s = row["cluster_s"] + row["plan_s"] + steps_s
    return dict(row, steps_s=steps_s, epoch_s=epoch_s, steps_timing=timing,
                overhead_pct=100 * (row["cluster_s"] + row["plan_s"]) / epoch_s)


def growth(rows, var, fixed, value):
    """One line: each part's exponent a in time ~ var^a between the smallest and the largest var."""
    sweep = sorted((r for r in rows if r[fixed] == value), key=lambda r: r[var])
    if len(sweep) < 2:
        return None
    lo, hi = sweep[0], sweep[-1]
    span = math.log(hi[var] / lo[var])
    parts = ", ".join(f"{name} ^{math.log(max(hi[key], 1e-9) / max(lo[key], 1e-9)) / span:.2f}"
                      for key, name in PARTS)
    return f"growth with {var.upper()} ({fixed.upper()}={value:,}, {var.upper()} {lo[var]:,} -> {hi[var]:,}): {parts}"


def report(rows, args, reference):
    device = jax.devices()[0]
    row = PRESETS[args.preset]["row"]
    table = sorted(rows, key=lambda r: (r["k"] != args.k0, r["k"], r["n"]))
    lines = ["## Epoch overhead", "",
             f"spcl_jax on {device.device_kind} ({jax.default_backend()}, {jax.device_count()} device(s)), "
             f"jax {jax.__version__}; {row.model} at {row.px} px, {row.dtype}, width {args.width}, batch "
             f"{args.batch} pairs; reference N0={args.n0:,}, K0={args.k0:,}; {common.load_note()}.", "",
             common.markdown(table, COLUMNS), ""]
    lines += [line for line in (growth(rows, "n", "k", args.k0), growth(rows, "k", "n", args.n0)) if line]
    if reference is not None:
        lines += ["", f"reference epoch (N0={args.n0:,}, K0={args.k0:,}): {reference['epoch_s']:.2f} s, overhead "
                  f"{reference['overhead_pct']:.1f}% (targets, CIFAR-10 scale on one H100 in bfloat16: "
                  "epoch < 15 s, overhead <= 10%)."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--sizes", type=common.positive_ints, help="pretrain set sizes N at K0 (default: the preset's)")
    parser.add_argument("--ks", type=common.positive_ints, help="prototype counts K at N0 (default: the preset's)")
    parser.add_argument("--n0", type=common.positive(int), help="reference N, timed with a real epoch")
    parser.add_argument("--k0", type=common.positive(int), help="reference K (the step's prototype classifier width)")
    parser.add_argument("--batch", type=common.positive(int), help="pairs per step (default: the preset's)")
    parser.add_argument("--width", type=common.positive(float), help="width multiplier (default: the preset's)")
    parser.add_argument("--out", help="also write the table (markdown) to this file, rewritten after every row")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    for name in ("sizes", "ks", "n0", "k0", "width"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    args.batch = args.batch or preset["row"].batch
    points = {(n, args.k0) for n in args.sizes} | {(args.n0, k) for k in args.ks} | {(args.n0, args.k0)}
    for n, k in sorted(points):
        if n < args.batch or n <= k:
            parser.error(f"N={n} with K={k}: every N must be at least the batch ({args.batch}) and above K "
                         "(a pair plan needs a prototype with two members)")
    args.points = [(args.n0, args.k0)] + sorted(points - {(args.n0, args.k0)}, key=lambda p: (p[1], p[0]))
    return args


def main(argv=None):
    runtime.configure()
    args = parse_args(argv)
    mesh = sharding.data_mesh()
    row = dataclasses.replace(PRESETS[args.preset]["row"], batch=args.batch)
    setup, state, _ = build_step(row, args.width, args.k0, mesh)
    pool = synthetic_splits(setup.config, max(n for n, _ in args.points), seed=2).pretrain
    images, labels = pool.load(np.arange(len(pool))).pixels, pool.labels
    key = jax.random.key(0)
    rows, reference, seconds_per_step = [], None, None
    for n, k in args.points:
        row_setup, pseudo, result = measure(setup, state, images, labels, n, k, jax.random.fold_in(key, n * k),
                                            first=reference is None)
        if reference is None:
            state, steps_s = real_epoch(row_setup, state, pseudo)
            seconds_per_step = steps_s / row_setup.steps_per_epoch
            reference = result = with_steps(result, steps_s, "run_epoch")
        else:
            result = with_steps(result, seconds_per_step * row_setup.steps_per_epoch, "s/step of N0, K0")
        rows.append(result)
        print(f"N={n:,} K={k:,}: epoch {result['epoch_s']:.2f} s, overhead {result['overhead_pct']:.1f}%", flush=True)
        common.save(args.out, report(rows, args, reference))
    print(report(rows, args, reference))


if __name__ == "__main__":
    main()
