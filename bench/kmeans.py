"""k-means speed and quality: spcl_jax.kmeans against scikit-learn and (when importable) faiss-cpu.

All methods get the same data (a mixture of Gaussians with K/4 centres, rows L2-normalised like SSL
embeddings), the same K initial centroids (random distinct rows) and the same number of Lloyd
iterations. ms/iter = wall time of the whole run (initial centroids given, final assignment
included) / iterations, the median of --repeats runs in which the methods take turns (so load from
other jobs hits them alike; the load average is printed before and after each size). Our compile
time (with one 0-iteration call) is reported separately. Inertia is recomputed in float64 from each
method's final centroids and labels, so the numbers are comparable. faiss-cpu is a benchmark-only
dependency (bench/requirements.txt); its column reads "-" when it is not importable.

    python -m bench.kmeans                       # CPU sizes: 50,000x128 K=512 and 200,000x128 K=1,000
    python -m bench.kmeans --sizes 2000x16x8 --iters 3 --repeats 1   # N x D x K, comma-separated
    python -m bench.kmeans --gpu                 # adds 1,281,167x128 K=3,000 (ImageNet), no sklearn there
"""
import argparse
import time

import jax
import numpy as np

from bench import common
from spcl_jax import kmeans as km
from spcl_jax import runtime

CPU_SIZES = "50000x128x512,200000x128x1000"
GPU_SIZE = (1281167, 128, 3000)


def make_data(n, d, k, seed):
    """Mixture of k/4 Gaussians, rows L2-normalised, and k distinct random rows as initial centroids."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(k // 4, 1), d)).astype(np.float32)
    x = centres[rng.integers(len(centres), size=n)]
    x += 0.5 * rng.normal(size=(n, d)).astype(np.float32)
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
    call = lambda n: jax.block_until_ready(km.kmeans(
        xd, len(c0), n, jax.random.key(0), init=c0, chunk_size=args.chunk_size,
        precision=args.precision))
    start = time.perf_counter()
    call(0)  # num_iters is traced: this one compile serves every iteration count
    compile_s = time.perf_counter() - start
    summary = lambda r: (exact_inertia(x, r.centroids, np.asarray(r.assignments)),
                         int(np.sum(np.asarray(r.cluster_sizes) == 0)))
    return lambda: call(iters), summary, compile_s


def run_sklearn(x, c0, iters, args):
    from sklearn.cluster import KMeans

    fit = lambda: KMeans(len(c0), init=c0, n_init=1, max_iter=iters, tol=0,
                         algorithm="lloyd").fit(x)
    summary = lambda m: (exact_inertia(x, m.cluster_centers_, m.labels_),
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


def main(argv=None):
    runtime.configure()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=parse_sizes, default=CPU_SIZES,
                        help="comma-separated NxDxK (default %(default)s)")
    parser.add_argument("--gpu", action="store_true",
                        help="add 1,281,167x128 K=3,000 (sklearn skipped for it; target < 2 s on an H100)")
    parser.add_argument("--iters", type=common.positive(int), default=20)
    parser.add_argument("--repeats", type=common.positive(int), default=3,
                        help="timed runs per method, taking turns (the median is kept)")
    parser.add_argument("--chunk-size", type=common.positive(int), default=None,
                        help="rows per E-step chunk (default: auto)")
    parser.add_argument("--precision", default="highest", choices=["highest", "high", "default"])
    parser.add_argument("--no-sklearn", action="store_true")
    parser.add_argument("--no-faiss", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    sizes = args.sizes + ([GPU_SIZE] if args.gpu else [])
    use_faiss = not args.no_faiss and faiss_available()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {args.iters} iterations, "
          f"chunk {args.chunk_size or 'auto'}, precision {args.precision}, median of {args.repeats} "
          f"interleaved runs; faiss {'on' if use_faiss else 'off' if args.no_faiss else 'not installed'}")
    header = ("| N x D | K | ours ms/iter (compile s) | sklearn ms/iter | faiss ms/iter | "
              "inertia ours / sklearn / faiss | empty clusters ours / sklearn / faiss |")
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]
    print("\n".join(lines))
    for n, d, k in sizes:
        x, c0 = make_data(n, d, k, args.seed)
        skip_sklearn = args.no_sklearn or (args.gpu and (n, d, k) == GPU_SIZE)
        methods = {name: make(x, c0, args.iters, args) for name, make, on in (
            ("ours", run_ours, True), ("sklearn", run_sklearn, not skip_sklearn),
            ("faiss", run_faiss, use_faiss)) if on}
        load_before = common.load_note()
        last = {}
        seconds = common.time_interleaved(
            {name: (lambda name=name, fit=fit: last.__setitem__(name, fit()))
             for name, (fit, _, _) in methods.items()}, args.repeats)
        cols = {name: ("-", "-", "-") for name in ("ours", "sklearn", "faiss")}
        for name, (_, summary, _) in methods.items():
            inertia, empty = summary(last[name])
            cols[name] = (f"{seconds[name] / args.iters * 1000:.1f}", f"{inertia:.2f}", str(empty))
        lines.append(f"| {n:,} x {d} | {k:,} | {cols['ours'][0]} ({methods['ours'][2]:.2f}) "
                     f"| {cols['sklearn'][0]} | {cols['faiss'][0]} "
                     f"| {' / '.join(c[1] for c in cols.values())} "
                     f"| {' / '.join(c[2] for c in cols.values())} |")
        print(lines[-1], flush=True)
        print(f"({n:,} x {d}, K={k:,}: {load_before} before, {common.load_note()} after)", flush=True)
    if len(sizes) > 1:  # the table again in one piece, the load notes having split it
        print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
