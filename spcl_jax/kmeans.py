"""k-means and PCA-whitening of the clustering features (DIFFERENCES.md, clustering, D-19 to D-22), on rows sharded over devices.

The original ran faiss on one GPU over all N gathered features. Here the features stay where the
feature pass left them: a (N, D) array whose rows are sharded over the mesh axis ``'data'``
(``NamedSharding(mesh, P('data', None))``, across hosts too) or an ordinary single-device array.
Everything runs under one ``jax.shard_map``: each device works on its own rows and only K x D
statistics, D x D covariances and a few scalars per device cross devices (``psum``/``all_gather``),
so x is never gathered. The nearest-centroid search goes over row chunks, so memory stays
O(chunk_size x K) and the N x K distance matrix is never built.

Padded rows: the feature pass pads N up to a multiple of the device count; pass ``valid`` (N,) bool
and the padded rows count nowhere (sizes, sums, inertia, initial centroids, PCA statistics). They get
assignment -1 and all-zero preprocessed features.

Over 400 lines on purpose: k-means and the PCA-whitening before it share the placement of rows on the mesh, the
padding masks and the shard_map plumbing (`_place_rows`, `_shard_call`, `_psum`); apart, those private helpers
would become a third module's public API for two callers.
"""
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from jax.typing import ArrayLike

from spcl_jax.sharding import from_whole

DATA_AXIS = "data"
INITS = ("random", "kmeans++")
ALGORITHMS = ("Kmeans",)  # the original's `clustering` flag: k-means is its only algorithm (PIC never existed)
SPLIT_EPS = 1.0 / 1024  # faiss's relative perturbation when an empty cluster takes half of another
# Exact M-step sums: rows as FIXED_POINT_BITS-bit fixed point in LIMBS limbs of LIMB_BITS bits, summed as
# int32: exact for up to 2^31 / 2^LIMB_BITS = 8.4M rows (MAX_EXACT_ROWS).
FIXED_POINT_BITS = 22
LIMB_BITS = 8
LIMBS = 3
MAX_EXACT_ROWS = 2 ** (31 - LIMB_BITS)
EIGEN_FLOOR = 1e-5  # default: eigenvalues below this fraction of the largest one are raised to it before ^-1/2
# Default distance block per chunk: cache-sized on CPUs, large on accelerators, where bigger chunks mean fewer,
# fuller matmuls (measured sizes: BENCHMARKS.md, k-means).
CHUNK_BYTES = {"cpu": 4 << 20, "accelerator": 256 << 20}


class KMeansResult(NamedTuple):
    """Outcome of `kmeans`; a pytree, so it can leave a jitted function."""

    centroids: jax.Array  # (K, D) float32, replicated
    assignments: jax.Array  # (N,) int32, sharded like x's rows; -1 on rows where valid is False
    inertia: jax.Array  # () float32, sum of squared distances of valid rows to their centroid
    cluster_sizes: jax.Array  # (K,) int32, valid rows per cluster


def kmeans(x: ArrayLike, num_clusters: int, num_iters: int, key: jax.Array, *, init: str | ArrayLike = "random",
           chunk_size: int | None = None, valid: ArrayLike | None = None, ids: ArrayLike | None = None,
           precision: str = "highest") -> KMeansResult:
    """Lloyd's k-means as faiss runs it for DeepCluster/SPCL, with no cluster left empty.

    Each of `num_iters` iterations assigns every row to its nearest centroid (squared L2) and moves
    each centroid to the mean of its rows; a cluster left empty then takes half of a cluster picked
    with probability proportional to (size - 1), with faiss's symmetric ±1/1024 perturbation. A
    final assignment follows; if a cluster is still empty, the farthest row of the biggest cluster
    moves into it (and becomes its centroid) until none is, which always ends with no empty cluster
    when there are at least K valid rows, duplicated or not.

    `init`: "random" (K distinct valid rows, faiss's default and the original's), "kmeans++"
    (D²-weighted seeding, one draw per centroid) or a (K, D) array of initial centroids.
    `valid`: optional (N,) bool; rows where it is False (padding) count nowhere and get assignment
    -1. `ids`: optional (N,) int, what each row is (e.g. its example's index in the dataset); every
    random choice (initial rows, k-means++ draws) is drawn per id and ties are broken by the lowest
    id, so rows laid out in another order (the feature pass's row order depends on the device count)
    give the same clustering. Default: the row index. `chunk_size`: rows per distance block, memory
    O(chunk_size x K); None = a 4 MiB block on CPUs, 256 MiB on accelerators. `precision` goes to
    the distance matmul ("highest" keeps float32 accuracy on GPUs too; "default" lets them use TF32).
    The centroids' sums are exact (fixed point, `_cluster_means`), so they do not depend on the
    order in which devices and processes add them up. Multi-host: the assignments are a global
    array; fetch them with `jax.experimental.multihost_utils.process_allgather`.
    """
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be (N, D), got shape {x.shape}")
    if num_clusters < 1 or num_iters < 0 or (chunk_size is not None and chunk_size < 1):
        raise ValueError(f"need num_clusters >= 1, num_iters >= 0, chunk_size >= 1; got "
                         f"{num_clusters}, {num_iters}, {chunk_size}")
    init_centroids = None
    if not isinstance(init, str):
        init_centroids = jnp.asarray(init, jnp.float32)
        if init_centroids.shape != (num_clusters, x.shape[1]):
            raise ValueError(f"init centroids must have shape {(num_clusters, x.shape[1])}, got "
                             f"{init_centroids.shape}")
        init = "given"
    elif init not in INITS:
        raise ValueError(f"init must be one of {INITS} or a (K, D) array, got {init!r}")
    mesh = _data_mesh(x)
    x, valid = _place_rows(mesh, x, valid)
    ids = jax.device_put(jnp.arange(x.shape[0], dtype=jnp.int32) if ids is None else jnp.asarray(ids, jnp.int32),
                         NamedSharding(mesh, P(DATA_AXIS)))
    if ids.shape != x.shape[:1]:
        raise ValueError(f"ids must have shape {x.shape[:1]}, got {ids.shape}")
    num_valid = x.shape[0] if valid is None else int(jnp.sum(valid))
    if num_valid < num_clusters:
        raise ValueError(f"k-means needs at least num_clusters={num_clusters} valid rows, got "
                         f"{num_valid}")
    if x.shape[0] > MAX_EXACT_ROWS:
        raise ValueError(f"k-means sums exactly over at most {MAX_EXACT_ROWS:,} rows, got {x.shape[0]:,}")
    return _kmeans_jit(x, valid, ids, key, init_centroids, jnp.int32(num_iters), mesh=mesh,
                       num_clusters=num_clusters, init=init, chunk_size=_chunk_rows(mesh, x.shape[0], num_clusters,
                                                                                    chunk_size),
                       precision=lax.Precision(precision))


def _chunk_rows(mesh, num_rows, num_clusters, chunk_size):
    """Rows per distance block: the given size or the platform's default, at most a device's rows."""
    if chunk_size is None:
        kind = "cpu" if mesh.devices.flat[0].platform == "cpu" else "accelerator"
        chunk_size = max(256, CHUNK_BYTES[kind] // (4 * num_clusters))
    return min(chunk_size, num_rows // mesh.shape[DATA_AXIS])  # one compile for all larger


def lower_kmeans(x: jax.ShapeDtypeStruct, num_clusters: int, *, init: str = "random", chunk_size: int | None = None,
                 precision: str = "highest") -> jax.stages.Lowered:
    """The program `kmeans` runs on a feature bank like `x` (a `jax.ShapeDtypeStruct` (N, D) float32 with its rows
    sharded on a mesh's 'data' axis), with padding rows and ids as a run passes them, lowered without data: for
    compiling it for devices that are not here (`spcl_jax.plan`). The iteration count is an argument of the
    program, so one compile serves every `kmeans_iters`."""
    mesh = x.sharding.mesh
    rows = NamedSharding(mesh, P(DATA_AXIS))
    spec = lambda shape, dtype, sharding=rows: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
    n = x.shape[0]
    return _kmeans_jit.lower(spec(x.shape, jnp.float32, x.sharding), spec((n,), bool), spec((n,), jnp.int32),
                             jax.eval_shape(lambda: jax.random.key(0)), None, spec((), jnp.int32, None), mesh=mesh,
                             num_clusters=num_clusters, init=init,
                             chunk_size=_chunk_rows(mesh, n, num_clusters, chunk_size),
                             precision=lax.Precision(precision))


class Whitened(NamedTuple):
    """Outcome of `pca_whiten`."""

    features: jax.Array  # (N, min(pca_dim, D)) float32, sharded like the input rows
    floored: jax.Array  # () int32, components whose eigenvalue was raised to the floor


def pca_whiten(x: ArrayLike, pca_dim: int, valid: ArrayLike | None = None,
               eigen_floor: float = EIGEN_FLOOR) -> Whitened:
    """PCA-whitening as faiss's PCAMatrix(D, pca_dim, eigen_power=-0.5): Λ^-1/2 Vᵀ (x − μ).

    Keeps min(pca_dim, D) components. μ and the covariance (divided by the number of valid rows,
    as faiss does) are sums over the sharded rows. Eigenvalues below `eigen_floor` x the largest are
    raised to it (0: none, as faiss, which divides by ~0 on rank-deficient features); above the floor
    the whitened covariance is the identity. Each component's sign is fixed so that its
    eigenvector's largest-magnitude entry is positive, which makes the output deterministic.

    The D x D eigendecomposition runs on the host's CPU, as faiss's does: XLA's TPU eigensolver is an
    unrolled Jacobi sweep whose program took 15 minutes to compile for D = 2048 (BENCHMARKS.md, planning).
    """
    x = jnp.asarray(x)
    if pca_dim < 1:
        raise ValueError(f"pca_dim must be >= 1 for pca_whiten, got {pca_dim}")
    mesh = _data_mesh(x)
    x, valid = _place_rows(mesh, x, valid)
    mean, cov = _pca_stats_jit(x, valid, mesh=mesh)
    out_dim = min(pca_dim, x.shape[1])
    projection = _host_eigenbasis(cov, jnp.float32(eigen_floor), out_dim)
    evecs, scale, floored = (from_whole(a, NamedSharding(mesh, P())) for a in projection)
    return Whitened(_pca_project_jit(x, valid, mean, evecs, scale, mesh=mesh), floored)


def _host_eigenbasis(cov, eigen_floor, out_dim):
    """numpy (eigenvectors (D, out_dim), scales Λ^-1/2 (out_dim,), floored count) of the replicated covariance,
    computed on the host's CPU from this process's copy of it; with several processes, process 0's result for all
    (hosts of another CPU model could round differently, and the replicas must be equal)."""
    cpu = jax.local_devices(backend="cpu")[0]  # jax.devices("cpu")[0] is process 0's
    local = np.asarray(cov.addressable_data(0))  # the whole matrix: a global array cannot be fetched across hosts
    basis = jax.device_get(_eigenbasis_jit(jax.device_put(local, cpu), jax.device_put(eigen_floor, cpu),
                                           out_dim=out_dim))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        basis = multihost_utils.broadcast_one_to_all(basis)
    return tuple(np.asarray(a) for a in basis)


def lower_pca_whiten(x: jax.ShapeDtypeStruct, pca_dim: int) -> tuple[jax.stages.Lowered, jax.stages.Lowered]:
    """The device programs of `pca_whiten` for a feature bank like `x` (see `lower_kmeans`), lowered without data:
    (the mean and covariance, the projection). The eigendecomposition between them runs on the host."""
    mesh, dim = x.sharding.mesh, x.shape[1]
    out_dim = min(pca_dim, dim)
    replicated = NamedSharding(mesh, P())
    spec = lambda shape, sharding=replicated: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)  # noqa: E731
    rows = (spec(x.shape, x.sharding),
            jax.ShapeDtypeStruct(x.shape[:1], bool, sharding=NamedSharding(mesh, P(DATA_AXIS))))
    return (_pca_stats_jit.lower(*rows, mesh=mesh),
            _pca_project_jit.lower(*rows, spec((dim,)), spec((dim, out_dim)), spec((out_dim,)), mesh=mesh))


@jax.jit
def l2_normalize_rows(x: ArrayLike) -> jax.Array:
    """Scales each row to unit L2 norm; all-zero rows (padding) stay zero instead of becoming NaN."""
    x = x.astype(jnp.float32)
    norm = jnp.linalg.norm(x, axis=1, keepdims=True)
    return jnp.where(norm > 0, x / jnp.where(norm > 0, norm, 1.0), 0.0)


def preprocess_features(x: ArrayLike, pca_dim: int, valid: ArrayLike | None = None,
                        eigen_floor: float = EIGEN_FLOOR) -> Whitened:
    """The original's preprocessing: PCA-whitening to `pca_dim` (0 = none), then row L2-normalising.
    Returns a `Whitened` (floored = 0 without PCA)."""
    if not pca_dim:
        return Whitened(l2_normalize_rows(x), jnp.int32(0))
    whitened = pca_whiten(x, pca_dim, valid, eigen_floor)
    return whitened._replace(features=l2_normalize_rows(whitened.features))


def _data_mesh(x):
    """The mesh x's rows are sharded on, or a one-device mesh for an unsharded array."""
    sharding = x.sharding
    if (isinstance(sharding, NamedSharding) and len(sharding.spec) > 0
            and sharding.spec[0] == DATA_AXIS):
        return sharding.mesh
    device = next(iter(x.devices()))
    return Mesh(np.array([device]), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def _place_rows(mesh, x, valid):
    """x and valid with their rows on `mesh`'s 'data' axis (a no-op when they already are)."""
    x = jax.device_put(x, NamedSharding(mesh, P(DATA_AXIS, None)))
    if valid is not None:
        valid = jnp.asarray(valid)
        if valid.shape != x.shape[:1]:
            raise ValueError(f"valid must have shape {x.shape[:1]}, got {valid.shape}")
        valid = jax.device_put(valid.astype(bool), NamedSharding(mesh, P(DATA_AXIS)))
    return x, valid


def _shard_call(fn, mesh, args, arg_specs, out_specs):
    """shard_map of fn over `mesh`, with None arguments passed through as None."""
    in_specs = tuple(None if a is None else s for a, s in zip(args, arg_specs))
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)(*args)


@functools.partial(jax.jit, static_argnames=("mesh", "num_clusters", "init", "chunk_size",
                                             "precision"))
def _kmeans_jit(x, valid, ids, key, init_centroids, num_iters, *, mesh, num_clusters, init, chunk_size,
                precision):
    fn = functools.partial(_kmeans_shard, num_clusters=num_clusters, init=init,
                           chunk_size=chunk_size, precision=precision)
    return _shard_call(fn, mesh, (x, valid, ids, key, init_centroids, num_iters),
                       (P(DATA_AXIS, None), P(DATA_AXIS), P(DATA_AXIS), P(), P(), P()),
                       KMeansResult(P(), P(DATA_AXIS), P(), P()))


def _kmeans_shard(x, valid, ids, key, init_centroids, num_iters, *, num_clusters, init, chunk_size,
                  precision):
    """The whole k-means, seen from one device holding x's local rows."""
    n_local = x.shape[0]
    x = x.astype(jnp.float32)
    valid = jnp.ones(n_local, bool) if valid is None else valid
    gidx = lax.axis_index(DATA_AXIS) * n_local + jnp.arange(n_local)
    init_key, split_key = jax.random.split(key)
    scale = lax.pmax(jnp.max(jnp.where(valid[:, None], jnp.abs(x), 0.0)), DATA_AXIS)
    if init == "given":
        centroids = init_centroids
    elif init == "random":
        centroids = _init_random(x, valid, gidx, ids, init_key, num_clusters)
    else:
        centroids = _init_kmeanspp(x, valid, gidx, ids, init_key, num_clusters)

    def lloyd_step(it: jax.Array, centroids: jax.Array) -> jax.Array:
        means, counts = _cluster_means(x, valid, centroids, scale, chunk_size, precision)
        means = jnp.where(counts[:, None] > 0, means, centroids)
        return _split_empty(means, counts, jax.random.fold_in(split_key, it))

    centroids = lax.fori_loop(0, num_iters, lloyd_step, centroids)
    assign, dist = _assign(x, valid, centroids, chunk_size, precision)
    counts = _psum(jax.ops.segment_sum(valid.astype(jnp.int32),
                                       jnp.where(valid, assign, num_clusters), num_clusters))
    assign, dist, centroids, counts = _fill_empty(x, valid, gidx, ids, assign, dist, centroids, counts)
    inertia = _psum(jnp.sum(jnp.where(valid, dist, 0.0)))
    return KMeansResult(centroids, jnp.where(valid, assign, -1).astype(jnp.int32), inertia, counts)


def _psum(v):
    return lax.psum(v, DATA_AXIS)


def _scan_rows(fn, carry, x, valid, chunk_size):
    """Runs fn(carry, x_chunk, valid_chunk) -> (carry, per-row outputs) over row chunks."""
    chunk = chunk_size
    n_full, rem = divmod(x.shape[0], chunk)

    def step(carry: Any, i: jax.Array) -> tuple[Any, Any]:
        start = i * chunk
        return fn(carry, lax.dynamic_slice_in_dim(x, start, chunk),
                  lax.dynamic_slice_in_dim(valid, start, chunk))

    carry, ys = lax.scan(step, carry, jnp.arange(n_full))
    ys = jax.tree.map(lambda y: y.reshape(n_full * chunk, *y.shape[2:]), ys)
    if rem:
        carry, ys_rem = fn(carry, x[n_full * chunk:], valid[n_full * chunk:])
        ys = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys, ys_rem)
    return carry, ys


def _augment(centroids):
    """[−2c | ‖c‖²] (K, D+1): against rows [x | 1] one matmul gives ‖c‖² − 2x·c, no extra pass."""
    return jnp.concatenate([-2.0 * centroids, jnp.sum(centroids * centroids, axis=1)[:, None]], 1)


def _nearest(xc, c_aug, precision):
    """Nearest centroid (the lowest index on ties) and squared distance per row.

    The distances ‖c‖² − 2x·c (‖x‖² is the same for every centroid) are laid out (K, chunk), and
    the argmin is two single-operand min reductions over K: the minimum, then the lowest index that
    reaches it. On XLA's CPU backend that is about half the cost of its variadic (value, index)
    argmin over rows (BENCHMARKS.md, k-means). A row whose distances are NaN gets index K - 1.
    """
    k = c_aug.shape[0]
    xa = jnp.concatenate([xc, jnp.ones((xc.shape[0], 1), xc.dtype)], axis=1)
    d = jnp.dot(c_aug, xa.T, precision=precision)
    # The min with row 0 changes nothing; it stops XLA's CPU backend from writing out a (K, chunk)
    # broadcast of the row minima with the reduction (about 10% of a Lloyd step at K=1,000).
    dmin = jnp.minimum(jnp.min(d, axis=0), d[0])
    index = lax.broadcasted_iota(jnp.int32, d.shape, 0)
    assign = jnp.minimum(jnp.min(jnp.where(d <= dmin, index, k), axis=0), k - 1)
    return assign, jnp.maximum(dmin + jnp.sum(xc * xc, axis=1), 0.0)


def _cluster_means(x, valid, centroids, scale, chunk_size, precision):
    """E-step + M-step: per-cluster means (K, D) and counts (K,) over all devices.

    The sums are exact: each row is rounded to a fixed-point integer (FIXED_POINT_BITS bits for the
    largest |x| over all rows, `scale`), cut into 8-bit limbs, and the limbs are summed as int32 within
    and across devices. Integer sums do not depend on the order of addition, so the centroids are the
    same bits however the rows are spread over devices and processes (float sums in another order
    would move a borderline row to another cluster).
    """
    k = centroids.shape[0]
    c_aug = _augment(centroids)

    def fn(carry: tuple[jax.Array, jax.Array], xc: jax.Array,
           vc: jax.Array) -> tuple[tuple[jax.Array, jax.Array], None]:
        assign, _ = _nearest(xc, c_aug, precision)
        assign = jnp.where(vc, assign, k)  # out of range: dropped by segment_sum
        limbs, counts = carry
        return (limbs + jax.ops.segment_sum(_fixed_point_limbs(xc, scale), assign, k),
                counts + jax.ops.segment_sum(jnp.ones_like(assign), assign, k)), None

    zeros = lax.pcast((jnp.zeros((k, centroids.shape[1], LIMBS), jnp.int32), jnp.zeros(k, jnp.int32)),
                      DATA_AXIS, to="varying")
    (limbs, counts), _ = _scan_rows(fn, zeros, x, valid, chunk_size)
    limbs, counts = _psum(limbs), _psum(counts)
    per_row = limbs.astype(jnp.float32) / jnp.maximum(counts, 1).astype(jnp.float32)[:, None, None]
    fixed = jnp.sum(per_row * (2.0 ** (LIMB_BITS * jnp.arange(LIMBS))), axis=-1) - 2.0 ** FIXED_POINT_BITS
    return fixed * (scale / 2.0 ** FIXED_POINT_BITS), counts


def _fixed_point_limbs(x, scale):
    """(rows, D, LIMBS) int32 limbs of round(x / scale * 2^bits) + 2^bits, a number in [0, 2^(bits + 1)]. One
    broadcast shift: stacking the limbs one by one compiled on XLA:CPU into a concatenation that took 42% of
    a k-means run's thread time (BENCHMARKS.md, k-means)."""
    q = jnp.round(x / jnp.maximum(scale, 1e-30) * 2.0 ** FIXED_POINT_BITS).astype(jnp.int32) + 2 ** FIXED_POINT_BITS
    return (q[..., None] >> (LIMB_BITS * jnp.arange(LIMBS, dtype=jnp.int32))) & (2 ** LIMB_BITS - 1)


def _assign(x, valid, centroids, chunk_size, precision):
    """Nearest centroid and squared distance of every local row."""
    c_aug = _augment(centroids)
    _, (assign, dist) = _scan_rows(
        lambda carry, xc, vc: (carry, _nearest(xc, c_aug, precision)),
        None, x, valid, chunk_size)
    return assign, dist


def _split_empty(centroids, counts, key):
    """faiss's split_clusters: each empty cluster takes half of a cluster picked ∝ (size − 1)."""
    sign = jnp.where(jnp.arange(centroids.shape[1]) % 2 == 0, 1.0, -1.0)

    def needs_split(state: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        _, counts, _ = state
        return jnp.any(counts == 0) & jnp.any(counts >= 2)

    def split(state: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        centroids, counts, i = state
        empty = jnp.argmax(counts == 0)
        logits = jnp.where(counts >= 2, jnp.log(jnp.maximum(counts - 1, 1).astype(jnp.float32)),
                           -jnp.inf)
        donor = jax.random.categorical(jax.random.fold_in(key, i), logits)
        base = centroids[donor]
        centroids = (centroids.at[empty].set(base * (1 + SPLIT_EPS * sign))
                     .at[donor].set(base * (1 - SPLIT_EPS * sign)))
        half = counts[donor] // 2
        counts = counts.at[empty].set(half).at[donor].add(-half)
        return centroids, counts, i + 1

    centroids, _, _ = lax.while_loop(needs_split, split, (centroids, counts, 0))
    return centroids


def _fill_empty(x, valid, gidx, ids, assign, dist, centroids, counts):
    """Moves the farthest row of the biggest cluster into each empty cluster, which it then centres."""
    def has_empty(state: tuple[jax.Array, jax.Array, jax.Array, jax.Array]) -> jax.Array:
        counts = state[3]
        return jnp.any(counts == 0) & (jnp.max(counts) >= 2)

    def fill(state: tuple[jax.Array, jax.Array, jax.Array, jax.Array]
             ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        assign, dist, centroids, counts = state
        empty, donor = jnp.argmax(counts == 0), jnp.argmax(counts)
        row = _global_argmax(jnp.where(valid & (assign == donor), dist, -jnp.inf), gidx, ids)
        centroids = centroids.at[empty].set(_take_rows(x, gidx, row[None])[0])
        moved = gidx == row
        return (jnp.where(moved, empty, assign), jnp.where(moved, 0.0, dist), centroids,
                counts.at[empty].set(1).at[donor].add(-1))

    return lax.while_loop(has_empty, fill, (assign, dist, centroids, counts))


def _all_gather(v):
    return lax.all_gather(v, DATA_AXIS, tiled=True, to="invarying")


def _global_argmax(score, gidx, ids):
    """Global row index of the largest score over all devices (ties: the row of the lowest id)."""
    top = jnp.max(score)
    i = jnp.argmin(jnp.where(score == top, ids, jnp.iinfo(jnp.int32).max))
    tops, local_ids, rows = (_all_gather(v[None]) for v in (top, ids[i], gidx[i]))
    return rows[jnp.argmin(jnp.where(tops == jnp.max(tops), local_ids, jnp.iinfo(jnp.int32).max))]


def _take_rows(x, gidx, rows):
    """x[rows] for global row indices: each device contributes the rows it holds, then psum."""
    local = rows - gidx[0]
    mine = (local >= 0) & (local < x.shape[0])
    return _psum(jnp.where(mine[:, None], x[jnp.clip(local, 0, x.shape[0] - 1)], 0.0))


def _row_uniform(key, ids):
    """U[0, 1) per row id, the same however the rows are laid out and sharded."""
    return jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)))(ids)


def _init_random(x, valid, gidx, ids, key, k):
    """K distinct valid rows, uniformly: the K largest per-id uniforms over all devices."""
    score = jnp.where(valid, _row_uniform(key, ids), -1.0)
    top, pos = lax.top_k(score, min(k, x.shape[0]))
    _, pick = lax.top_k(_all_gather(top), k)
    return _take_rows(x, gidx, _all_gather(gidx[pos])[pick])


def _init_kmeanspp(x, valid, gidx, ids, key, k):
    """k-means++ seeding: each next centroid is a row drawn ∝ its squared distance to the chosen ones.

    One draw per centroid (no greedy trials); the draw is a Gumbel-max over per-row noise, so it is
    the same however the rows are sharded.
    """
    def draw(i: int | jax.Array, weights: jax.Array) -> jax.Array:
        gumbel = -jnp.log(-jnp.log(_row_uniform(jax.random.fold_in(key, i), ids)))
        score = jnp.where(weights > 0, jnp.log(jnp.maximum(weights, 1e-30)) + gumbel, -3e38)
        row = _global_argmax(jnp.where(valid, score, -jnp.inf), gidx, ids)
        return _take_rows(x, gidx, row[None])[0]

    def add(i: jax.Array, state: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        centroids, min_sq = state
        c = draw(i, min_sq)
        min_sq = jnp.minimum(min_sq, jnp.sum((x - c) ** 2, axis=1))
        return centroids.at[i].set(c), min_sq

    first = draw(0, jnp.ones(x.shape[0], jnp.float32))
    centroids = jnp.zeros((k, x.shape[1]), jnp.float32).at[0].set(first)
    centroids, _ = lax.fori_loop(1, k, add, (centroids, jnp.sum((x - first) ** 2, axis=1)))
    return centroids


@functools.partial(jax.jit, static_argnames=("mesh",))
def _pca_stats_jit(x, valid, *, mesh):
    return _shard_call(_pca_stats_shard, mesh, (x, valid), (P(DATA_AXIS, None), P(DATA_AXIS)), (P(), P()))


def _pca_stats_shard(x, valid):
    """Mean and covariance over the valid rows of all devices: two passes (mean, then centred) with the sums psum'd."""
    x = x.astype(jnp.float32)
    valid = jnp.ones(x.shape[0], bool) if valid is None else valid
    n = _psum(jnp.sum(valid, dtype=jnp.float32))
    mean = _psum(jnp.sum(jnp.where(valid[:, None], x, 0.0), axis=0)) / n
    xc = jnp.where(valid[:, None], x - mean, 0.0)
    return mean, _psum(jnp.dot(xc.T, xc, precision=lax.Precision.HIGHEST)) / n


@functools.partial(jax.jit, static_argnames=("out_dim",))
def _eigenbasis_jit(cov, eigen_floor, *, out_dim):
    evals, evecs = jnp.linalg.eigh(cov)
    evals, evecs = evals[::-1][:out_dim], evecs[:, ::-1][:, :out_dim]
    biggest = jnp.argmax(jnp.abs(evecs), axis=0)
    evecs = evecs * jnp.sign(evecs[biggest, jnp.arange(out_dim)])
    floor = eigen_floor * evals[0]
    return evecs, lax.rsqrt(jnp.maximum(evals, floor)), jnp.sum(evals < floor, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=("mesh",))
def _pca_project_jit(x, valid, mean, evecs, scale, *, mesh):
    return _shard_call(_pca_project_shard, mesh, (x, valid, mean, evecs, scale),
                       (P(DATA_AXIS, None), P(DATA_AXIS), P(), P(), P()), P(DATA_AXIS, None))


def _pca_project_shard(x, valid, mean, evecs, scale):
    x = x.astype(jnp.float32)
    valid = jnp.ones(x.shape[0], bool) if valid is None else valid
    xc = jnp.where(valid[:, None], x - mean, 0.0)
    return jnp.dot(xc, evecs, precision=lax.Precision.HIGHEST) * scale
