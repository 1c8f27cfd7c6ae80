"""PCA-whitening and k-means as clustering.cluster runs them: spcl_jax against scikit-learn and (when importable) faiss-cpu.

    python -m bench.kmeans          # CPU: PCA 50,000 x 2,048 -> 256; k-means 50,000 and 100,000 x 256, K = 512
    python -m bench.kmeans --gpu    # adds 1,281,167 rows (ImageNet): PCA 2,048 -> 256, k-means K = 512 and 3,000
    python -m bench.kmeans --sizes 2000x16x8 --pca-sizes 500x32 --pca-dim 8 --iters 3 --repeats 2   # a smoke run

Conditions as the configs use them: k-means sees the features after PCA-whitening to `pca_dim` = 256
(configs/default.py; ResNet-18's 512 and ResNet-50's 2,048 feature dims both come down to 256), with
K = `num_prototypes` = 512 and 20 Lloyd iterations (`kmeans_iters`); the PCA input is ResNet-50's 2,048-dim
features. float32 throughout; the distance matmul at `--precision` (default "highest", what clustering.cluster
uses), PCA's matmuls always at "highest".

PCA table: `kmeans.preprocess_features` (PCA-whitening to --pca-dim, then row L2-normalising) of N x D_in
non-negative, anisotropic random features made on the device; compile s = its first call.

k-means table: every method gets the same data (a mixture of Gaussians with K/4 centres, rows
L2-normalised like the whitened features), the same K initial centroids (random distinct rows) and the same
number of Lloyd iterations. ms/iter = wall time of one whole run (initial centroids given, final assignment
included) / iterations: median (min–max) of --repeats rounds in which the methods take turns (after one
untimed warm-up run each; bench/common.py `interleaved`). "sklearn / ours" and "faiss / ours": ratio of the
median times (>1 = ours faster) with the range of the per-round ratios. Our compile time (one 0-iteration
call) is reported separately. Inertia is recomputed in float64 from each method's final centroids and
labels. faiss-cpu is a benchmark-only dependency (bench/requirements.txt); its columns read "-" without it.
scikit-learn and faiss use their default threads (named in the output).
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from spcl_jax import kmeans as km
from spcl_jax import runtime

CPU_SIZES = "50000x256x512,100000x256x512"  # CIFAR-10/100 and Tiny ImageNet scale at the configs' D and K
GPU_SIZES = [(1281167, 256, 512), (1281167, 256, 3000)]  # ImageNet: configs/imagenet.py's K, the stated target's K
CPU_PCA_SIZES = "50000x2048"
GPU_PCA_SIZES = [(1281167, 2048)]
PCA_DIM = 256  # configs/default.py and configs/imagenet.py
ITERS = 20  # configs/default.py kmeans_iters


def make_data(n, d, k, seed):
    """Mixture of k/4 Gaussians, rows L2-normalised, and k distinct random rows as initial centroids."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(k // 4, 1), d), dtype=np.float32)
    x = centres[rng.integers(len(centres), size=n)]
    x += np.float32(0.5) * rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, x[rng.choice(n, k, replace=False)]


def exact_inertia(x, centroids, labels, chunk=65536):
    """Sum of squared distances of each row to its labelled centroid, in float64."""
    centroids = np.asarray(centroids, np.float64)
    return sum(float(np.sum((x[i:i + chunk] - centroids[labels[i:i + chunk]]) ** 2))
               for i in range(0, len(x), chunk))


def run_ours(x, c0, iters, args):
    """(fit closure, its result -> (inertia, empty clusters), compile seconds)."""
    xd = jax.device_put(x)
    call = lambda n: jax.block_until_ready(km.kmeans(  # noqa: E731
        xd, len(c0), n, jax.random.key(0), init=c0, chunk_size=args.chunk_size,
        precision=args.precision))
    start = time.perf_counter()
    call(0)  # num_iters is traced: this one compile serves every iteration count
    compile_s = time.perf_counter() - start
    summary = lambda r: (exact_inertia(x, r.centroids, np.asarray(r.assignments)),  # noqa: E731
                         int(np.sum(np.asarray(r.cluster_sizes) == 0)))
    return lambda: call(iters), summary, compile_s


def run_sklearn(x, c0, iters, args):
    from sklearn.cluster import KMeans

    fit = lambda: KMeans(len(c0), init=c0, n_init=1, max_iter=iters, tol=0,  # noqa: E731
                         algorithm="lloyd").fit(x)
    summary = lambda m: (exact_inertia(x, m.cluster_centers_, m.labels_),  # noqa: E731
                         len(c0) - len(np.unique(m.labels_)))
    return fit, summary, 0.0


def run_faiss(x, c0, iters, args):
    import faiss

    def fit():
        model = faiss.Kmeans(x.shape[1], len(c0), niter=iters, seed=0, spherical=False,
                             max_points_per_centroid=len(x))  # every row, no subsampling
        model.train(x, init_centroids=c0)
        return model

    def summary(model):
        labels = model.index.search(x, 1)[1][:, 0]
        return exact_inertia(x, model.centroids, labels), len(c0) - len(np.unique(labels))

    return fit, summary, 0.0


def faiss_available():
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def threads_note(use_sklearn, use_faiss):
    """The threads the baselines run with (their defaults, which follow the usable cores)."""
    parts = []
    if use_sklearn:
        import sklearn.cluster  # noqa: F401  (loads its OpenMP runtime, so that it is listed)
        from threadpoolctl import threadpool_info

        pools = sorted({f"{p['internal_api']} {p['num_threads']}" for p in threadpool_info()})
        parts.append(f"scikit-learn thread pools: {', '.join(pools) or 'none loaded yet'}")
    if use_faiss:
        import faiss

        parts.append(f"faiss {faiss.omp_get_max_threads()} OpenMP threads")
    return "; ".join(parts)


def parse_sizes(text):
    """argparse type: comma-separated NxDxK items with 1 <= K <= N and D >= 1."""
    sizes = []
    for item in text.split(","):
        try:
            n, d, k = (int(p) for p in item.lower().split("x"))
        except ValueError:
            n = d = k = 0
        if min(n, d, k) < 1 or k > n:
            raise argparse.ArgumentTypeError(f"expected NxDxK items with 1 <= K <= N (e.g. 2000x16x8), "
                                             f"got {item!r}")
        sizes.append((n, d, k))
    return sizes


def parse_pca_sizes(text):
    """argparse type: comma-separated NxD_in items, positive."""
    sizes = []
    for item in text.split(","):
        try:
            n, d = (int(p) for p in item.lower().split("x"))
        except ValueError:
            n = d = 0
        if min(n, d) < 1:
            raise argparse.ArgumentTypeError(f"expected NxD_in items (e.g. 50000x2048), got {item!r}")
        sizes.append((n, d))
    return sizes


def pca_features(n, d, seed):
    """N x D non-negative (post-ReLU, like pooled ResNet features), anisotropic float32 rows, made on the device."""
    @jax.jit
    def make(key):
        scales = jnp.geomspace(1.0, 0.01, d, dtype=jnp.float32)
        return jnp.maximum(jax.random.normal(key, (n, d), jnp.float32) * scales, 0.0)
    return jax.block_until_ready(make(jax.random.key(seed)))


def pca_table(sizes, args):
    """The PCA table's lines, each row printed as it is done."""
    header = (f"| N x D_in | -> D | ms, {common.SPREAD} | rounds | compile s (first call) | floored components |")
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]
    print("\n".join(lines), flush=True)
    for n, d in sizes:
        x = pca_features(n, d, args.seed)
        call = lambda x=x: jax.block_until_ready(km.preprocess_features(x, args.pca_dim))  # noqa: E731
        start = time.perf_counter()
        out = call()
        compile_s = time.perf_counter() - start
        seconds = common.interleaved({"pca": call}, args.repeats, warmup=0)["pca"]
        lines.append(f"| {n:,} x {d:,} | {min(args.pca_dim, d)} | {common.spread(seconds, 1e3)} | {len(seconds)} "
                     f"| {compile_s:.2f} | {int(out.floored)} |")
        print(lines[-1], flush=True)
        del x, out
    return lines


def main(argv=None):
    runtime.configure()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=parse_sizes, default=CPU_SIZES,
                        help="k-means sizes, comma-separated NxDxK (default %(default)s)")
    parser.add_argument("--pca-sizes", type=parse_pca_sizes, default=CPU_PCA_SIZES,
                        help="PCA input sizes, comma-separated NxD_in (default %(default)s: ResNet-50 features)")
    parser.add_argument("--pca-dim", type=common.positive(int), default=PCA_DIM,
                        help="PCA output dim (default %(default)s, the configs' pca_dim)")
    parser.add_argument("--no-pca", action="store_true", help="skip the PCA table")
    parser.add_argument("--gpu", action="store_true",
                        help="first the ImageNet sizes: PCA 1,281,167 x 2,048 and k-means 1,281,167 x 256 at K = 512 "
                             "and 3,000 (target < 2 s on an H100), ours only; then the others")
    parser.add_argument("--iters", type=common.positive(int), default=ITERS,
                        help="Lloyd iterations (default %(default)s, the configs' kmeans_iters)")
    parser.add_argument("--repeats", type=common.positive(int), default=5,
                        help="timed rounds, the methods taking turns (default %(default)s)")
    parser.add_argument("--chunk-size", type=common.positive(int), default=None,
                        help="rows per E-step chunk (default: auto)")
    parser.add_argument("--precision", default="highest", choices=["highest", "high", "default"],
                        help="the distance matmul's precision (default %(default)s, as clustering.cluster)")
    parser.add_argument("--no-sklearn", action="store_true")
    parser.add_argument("--no-faiss", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    print(common.machine_note(), flush=True)
    ours_only = GPU_SIZES if args.gpu else []
    sizes = ours_only + args.sizes
    pca_sizes = [] if args.no_pca else (GPU_PCA_SIZES if args.gpu else []) + args.pca_sizes
    use_sklearn = not args.no_sklearn
    use_faiss = not args.no_faiss and faiss_available()
    print(f"float32; k-means: {args.iters} Lloyd iterations, distance matmul precision {args.precision}, chunk "
          f"{args.chunk_size or 'auto'}; {common.SPREAD} of {args.repeats} interleaved rounds after one warm-up "
          f"run each; faiss {'on' if use_faiss else 'off' if args.no_faiss else 'not installed'}; "
          f"{threads_note(use_sklearn, use_faiss) or 'ours only'}", flush=True)
    if pca_sizes:
        print(f"\nPCA-whitening to {args.pca_dim} dims + row L2-normalising (kmeans.preprocess_features):\n",
              flush=True)
        pca_lines = pca_table(pca_sizes, args)
        print(f"({common.load_note()} after the PCA table)", flush=True)
    header = (f"| N x D | K | ours ms/iter, {common.SPREAD} | compile s | sklearn ms/iter, {common.SPREAD} "
              f"| faiss ms/iter, {common.SPREAD} | sklearn / ours | faiss / ours "
              "| inertia ours / sklearn / faiss | empty clusters ours / sklearn / faiss |")
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]
    print(f"\nk-means, {args.iters} iterations, time per iteration:\n", flush=True)
    print("\n".join(lines), flush=True)
    for n, d, k in sizes:
        x, c0 = make_data(n, d, k, args.seed)
        alone = (n, d, k) in ours_only
        methods = {name: make(x, c0, args.iters, args) for name, make, on in (
            ("ours", run_ours, True), ("sklearn", run_sklearn, use_sklearn and not alone),
            ("faiss", run_faiss, use_faiss and not alone)) if on}
        load_before = common.load_note()
        last = {}
        seconds = common.interleaved(
            {name: (lambda name=name, fit=fit, last=last: last.__setitem__(name, fit()))
             for name, (fit, _, _) in methods.items()}, args.repeats)
        per_iter = {name: [s / args.iters for s in t] for name, t in seconds.items()}
        cells = {name: dict(ms="-", ratio="-", inertia="-", empty="-") for name in ("ours", "sklearn", "faiss")}
        for name, (_, summary, _) in methods.items():
            inertia, empty = summary(last[name])
            cells[name].update(ms=common.spread(per_iter[name], 1e3), inertia=f"{inertia:.2f}", empty=str(empty))
            if name != "ours":
                cells[name]["ratio"] = common.ratio_cell(per_iter[name], per_iter["ours"])
        lines.append(f"| {n:,} x {d} | {k:,} | {cells['ours']['ms']} | {methods['ours'][2]:.2f} "
                     f"| {cells['sklearn']['ms']} | {cells['faiss']['ms']} "
                     f"| {cells['sklearn']['ratio']} | {cells['faiss']['ratio']} "
                     f"| {' / '.join(c['inertia'] for c in cells.values())} "
                     f"| {' / '.join(c['empty'] for c in cells.values())} |")
        print(lines[-1], flush=True)
        print(f"({n:,} x {d}, K={k:,}: before: {load_before}; after: {common.load_note()})", flush=True)
        del x, c0, methods, last
    if len(sizes) > 1 or pca_sizes:  # the tables again in one piece, the load notes having split them
        print()
        if pca_sizes:
            print("\n".join(pca_lines) + "\n")
        print("\n".join(lines))
    print(common.load_after())


if __name__ == "__main__":
    main()
