"""One SPCL epoch: time in training steps against the feature pass, k-means and pair planning, and their growth.

    python -m bench.epoch_overhead --preset cpu   # ResNet-18 at 1/16 width, N 1,024-8,192, K 128-1,024, 2-4 min
    python -m bench.epoch_overhead --preset gpu   # CIFAR-10 scale: 50,000 images of 32 px, ResNet-18, K=512,
                                                  # batch 512 pairs, bfloat16; N 12,500-100,000, K 128-2,048

Everything runs through the library on synthetic data (random uint8 images, random labels): `clustering.cluster`
(feature pass, PCA-whitening, k-means, pseudo labels and their statistics), `epoch_batches.epoch_plan` (member table
and pair plan) and `train.run_epoch` (host loader, the jitted step, metrics), plus the feature pass
(`features.extract_features`) and PCA + k-means (`kmeans.preprocess_features`, `kmeans.kmeans`) on their own.
One network is built (bench/train_step.py's `build_step`, K0 prototypes); each row reuses it on the first N
images with K prototypes. The training steps are timed with one real epoch at the reference (N0, K0) and
given as steps x that epoch's seconds per step elsewhere: N changes only the number of steps, K only the
prototype classifier's width. Times are warm (after a call that compiled): median (min–max) of --repeats
rounds (default 5) in which the parts take turns (bench/common.py `interleaved`; at (N0, K0) the real epoch
takes its turn too); k-means compile s is the first PCA + k-means call minus the median, paid once per (N, K)
in a run. epoch = cluster + planning + steps (of the medians); overhead = (cluster + planning) / epoch, of the
medians, with the range of the per-round overheads (other rows: each round's parts against the scaled median
steps). Precision: the preset's dtype for the network (the configs' bfloat16 on GPUs), float32 for PCA and
k-means; D after PCA-whitening = min(256, the network's feature dim), as the configs.
"""
import argparse
import dataclasses
import math
import statistics
import time
import types

import jax
import numpy as np

from bench import common
from bench.train_step import build_step, config_for, synthetic_splits
from spcl_jax import clustering, epoch_batches, features, kmeans, runtime, sharding, train
from spcl_jax.data import ArraySource
from spcl_jax.metrics import MetricWriter

PRESETS = {
    "cpu": dict(row=common.Row("resnet18", 32, "float32", 64), width=0.0625, n0=4096, k0=512,
                sizes=(1024, 2048, 4096, 8192), ks=(128, 512, 1024)),
    "gpu": dict(row=common.Row("resnet18", 32, "bfloat16", 512), width=1.0, n0=50000, k0=512,
                sizes=(12500, 25000, 50000, 100000), ks=(128, 512, 2048)),
}
COLUMNS = [("n", "N", "{:,}"), ("k", "K", "{:,}"), ("steps", "steps", "{}"),
           ("steps_cell", f"train steps s, {common.SPREAD}", "{}"),
           ("features_cell", f"feature pass s, {common.SPREAD}", "{}"),
           ("kmeans_cell", f"PCA + k-means s, {common.SPREAD}", "{}"),
           ("kmeans_compile_s", "k-means compile s", "{:.1f}"),
           ("plan_cell", f"pair planning s, {common.SPREAD}", "{}"),
           ("cluster_cell", f"clustering.cluster s, {common.SPREAD}", "{}"), ("epoch_s", "epoch s", "{:.2f}"),
           ("overhead_cell", "overhead %, of the medians (range)", "{}"), ("rounds", "rounds", "{}"),
           ("steps_timing", "steps timed by", "{}")]
FORMATS = {"steps_s": "{:.2f}", "features_s": "{:.2f}", "kmeans_s": "{:.2f}", "plan_s": "{:.3f}", "cluster_s": "{:.2f}"}
# What grows with N and K: (result key, name in the growth lines).
PARTS = [("features_s", "feature pass"), ("kmeans_s", "PCA + k-means"), ("plan_s", "planning"),
         ("cluster_s", "clustering.cluster")]


def timed(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def for_row(setup, images, labels, n, k):
    """The built setup on the first n images with k prototypes (its jitted functions do not depend on N or K)."""
    parts = setup.parts
    # prototype_classifier_width=num_prototypes (the default): the classifier's width follows K
    parts = dataclasses.replace(parts, clustering=dataclasses.replace(parts.clustering, num_prototypes=k,
                                                                      classifier_width=k))
    source = ArraySource(images[:n], labels[:n])
    splits = types.SimpleNamespace(**dict(vars(setup.splits), pretrain=source))
    return dataclasses.replace(setup, parts=parts, splits=splits, steps_per_epoch=n // parts.training.batch_size)


def feature_pass(setup, state, seed):
    """What `clustering.cluster` runs first: the frozen encoder over the pretrain set in dataset order."""
    encode = lambda batch: setup.encode(state.params, state.batch_stats, batch)  # noqa: E731
    source = setup.splits.pretrain
    parts = setup.parts
    maker = features.feature_pass(source, np.arange(len(source)), parts.training.batch_size,
                                  features.FEATURE_VIEWS[parts.clustering.feature_view], parts.recipe, seed)
    return features.extract_features(encode, maker, setup.mesh)


def pca_kmeans(setup, feats, position, key):
    """What `clustering.cluster` runs next: PCA-whitening and k-means of the valid rows."""
    c = setup.parts.clustering
    valid = sharding.to_global(sharding.host_slice(position < len(setup.splits.pretrain)),
                               sharding.batch_sharding(setup.mesh))
    x = kmeans.preprocess_features(feats, c.pca_dim, valid=valid, eigen_floor=c.pca_eigen_floor).features
    return kmeans.kmeans(x, c.num_prototypes, c.kmeans_iters, key, init=c.kmeans_init, valid=valid)


def epoch_runner(setup, holder, pseudo):
    """A callable running one real `train.run_epoch` on holder["state"] (replaced by the new state), after one
    step that compiled the train step (the step donates the state: every part reads it from the holder)."""
    warm_up = epoch_batches.load_batch(setup, 0, epoch_batches.epoch_plan(setup, 0, pseudo), 0, pseudo)
    holder["state"] = jax.block_until_ready(setup.train_step(holder["state"], warm_up)[0])
    no_checkpoints = types.SimpleNamespace(stop_requested=lambda **_: False, facts={})  # checkpoint_every_steps is 0
    loop = train.Loop(setup, MetricWriter("", enabled=False), no_checkpoints, "")

    def run():
        holder["state"], _ = train.run_epoch(loop, holder["state"], pseudo, 0, 0)
        jax.block_until_ready(holder["state"])

    return run


def measure(setup, holder, images, labels, n, k, key, repeats, reference):
    """(the row's setup, its table row without the step columns, per-round seconds of each part) of (n, k);
    at the `reference` point the real epoch takes its turn in the rounds too ("steps_s")."""
    setup = for_row(setup, images, labels, n, k)
    kmeans_key, cluster_key = jax.random.split(key)
    seed = (n, k)
    feature_pass(setup, holder["state"], seed)  # compiles the encoder (first row) and the buffer writes (new N)
    feats, position = feature_pass(setup, holder["state"], seed)
    _, first_s = timed(lambda: pca_kmeans(setup, feats, position, kmeans_key))
    pseudo = clustering.cluster(setup, holder["state"], 0, cluster_key)[0]  # warm (key splits, the statistics' imports)
    parts = {"features_s": lambda: jax.block_until_ready(feature_pass(setup, holder["state"], seed)),
             "kmeans_s": lambda: jax.block_until_ready(pca_kmeans(setup, feats, position, kmeans_key)),
             "cluster_s": lambda: jax.block_until_ready(clustering.cluster(setup, holder["state"], 0, cluster_key)),
             "plan_s": lambda: epoch_batches.epoch_plan(setup, 0, pseudo)}
    if reference:
        parts["steps_s"] = epoch_runner(setup, holder, pseudo)
    seconds = common.interleaved(parts, repeats, warmup=0)
    row = dict(n=n, k=k, steps=setup.steps_per_epoch, rounds=repeats,
               **{name: statistics.median(t) for name, t in seconds.items() if name != "steps_s"})
    row["kmeans_compile_s"] = max(first_s - row["kmeans_s"], 0.0)
    row["feature_dim"] = int(feats.shape[1])
    row["kmeans_dim"] = min(setup.parts.clustering.pca_dim or feats.shape[1], int(feats.shape[1]))
    return setup, row, seconds


def with_steps(row, steps_s, timing, seconds=None):
    """The row with its step columns: steps_s (seconds, or per-round seconds at the reference), the epoch and
    the overhead; `seconds` ({part: per-round seconds}) gives the cells their ranges."""
    steps_rounds = list(steps_s) if isinstance(steps_s, (list, tuple)) else None
    steps_median = statistics.median(steps_rounds) if steps_rounds else steps_s
    extras = row["cluster_s"] + row["plan_s"]
    epoch_s = extras + steps_median
    out = dict(row, steps_s=steps_median, epoch_s=epoch_s, steps_timing=timing, overhead_pct=100 * extras / epoch_s)
    seconds = dict(seconds or {})
    if steps_rounds:
        seconds["steps_s"] = steps_rounds
    for name, fmt in FORMATS.items():
        value = seconds.get(name)
        cell = common.spread(value, 1.0, fmt) if value else fmt.format(out[name])
        out[name.removesuffix("_s") + "_cell"] = cell + (" (scaled)" if name == "steps_s" and not value else "")
    if "cluster_s" in seconds and "plan_s" in seconds:
        rounds = len(seconds["cluster_s"])
        steps = seconds.get("steps_s", [steps_median] * rounds)
        per_round = [100 * (c + p) / (c + p + t) for c, p, t in zip(seconds["cluster_s"], seconds["plan_s"], steps)]
        out["overhead_cell"] = f"{out['overhead_pct']:.1f} ({min(per_round):.1f}–{max(per_round):.1f})"
    else:
        out["overhead_cell"] = f"{out['overhead_pct']:.1f}"
    return out


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


def report(rows, args, reference, note, done=False):
    device = jax.devices()[0]
    row = PRESETS[args.preset]["row"]
    table = sorted(rows, key=lambda r: (r["k"] != args.k0, r["k"], r["n"]))
    lines = ["## Epoch overhead", "", "```", note, "```", "",
             f"spcl_jax on {device.device_kind} ({jax.default_backend()}, {jax.device_count()} device(s)), "
             f"jax {jax.__version__}; {row.model} at {row.px} px, {row.dtype}, width {args.width}, batch "
             f"{args.batch} pairs; features of {rows[0]['feature_dim']} dims, k-means (float32) on "
             f"D = {rows[0]['kmeans_dim']} after PCA-whitening; reference N0={args.n0:,}, K0={args.k0:,}; "
             f"{args.repeats} rounds; {common.load_note()}.",
             "",
             common.markdown(table, COLUMNS), ""]
    lines += [line for line in (growth(rows, "n", "k", args.k0), growth(rows, "k", "n", args.n0)) if line]
    if reference is not None:
        lines += ["", f"reference epoch (N0={args.n0:,}, K0={args.k0:,}): {reference['epoch_s']:.2f} s, overhead "
                  f"{reference['overhead_pct']:.1f}% (targets, CIFAR-10 scale on one H100 in bfloat16: "
                  "epoch < 15 s, overhead <= 10%)."]
    if done:
        lines += ["", common.load_after()]
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
    parser.add_argument("--repeats", type=common.positive(int), default=5,
                        help="timed rounds per row, the parts taking turns (default %(default)s)")
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
    note = common.machine_note()
    print(note, flush=True)
    mesh = sharding.data_mesh()
    row = dataclasses.replace(PRESETS[args.preset]["row"], batch=args.batch)
    setup, state, _ = build_step(row, args.width, args.k0, mesh)
    holder = {"state": state}
    pool = synthetic_splits(config_for(row, args.width, args.k0), max(n for n, _ in args.points), seed=2).pretrain
    images, labels = pool.load(np.arange(len(pool))).pixels, pool.labels
    key = jax.random.key(0)
    rows, reference, seconds_per_step = [], None, None
    for n, k in args.points:
        row_setup, result, seconds = measure(setup, holder, images, labels, n, k, jax.random.fold_in(key, n * k),
                                             args.repeats, reference=reference is None)
        if reference is None:
            seconds_per_step = statistics.median(seconds["steps_s"]) / row_setup.steps_per_epoch
            reference = result = with_steps(result, seconds["steps_s"], "run_epoch", seconds)
        else:
            result = with_steps(result, seconds_per_step * row_setup.steps_per_epoch, "s/step of N0, K0", seconds)
        rows.append(result)
        print(f"N={n:,} K={k:,}: epoch {result['epoch_s']:.2f} s, overhead {result['overhead_cell']}%", flush=True)
        common.save(args.out, report(rows, args, reference, note))
    common.save(args.out, report(rows, args, reference, note, done=True))
    print(report(rows, args, reference, note, done=True))


if __name__ == "__main__":
    main()
