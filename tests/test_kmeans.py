"""k-means and PCA-whitening against scikit-learn / numpy, sharded over the 8 fake CPU devices."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from sklearn.cluster import KMeans

from spcl_jax import kmeans as km

KEY = jax.random.key(0)


def _blobs(n=1000, d=8, centres=10, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(centres, d)) * 3
    return (means[rng.integers(centres, size=n)] + rng.normal(size=(n, d))).astype(np.float32)


def _mesh():
    return jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))


def _shard(x, mesh):
    """Pads the rows to a multiple of 8, shards them over 'data'; returns (x, valid)."""
    pad = -len(x) % 8
    valid = np.arange(len(x) + pad) < len(x)
    x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    return (jax.device_put(x, NamedSharding(mesh, P("data", *[None] * (x.ndim - 1)))),
            jax.device_put(valid, NamedSharding(mesh, P("data"))))


def _check_sizes(result, n, k):
    sizes = np.asarray(result.cluster_sizes)
    assignments = np.asarray(result.assignments)
    np.testing.assert_array_equal(sizes, np.bincount(assignments[assignments >= 0], minlength=k))
    assert sizes.sum() == n and sizes.min() >= 1


def _exact_inertia(x, result):
    assignments = np.asarray(result.assignments)
    diff = x[assignments >= 0] - np.asarray(result.centroids, np.float64)[assignments[assignments >= 0]]
    return np.sum(diff ** 2)


def test_one_iteration_matches_sklearn():
    x = _blobs()
    c0 = x[np.random.default_rng(1).choice(len(x), 10, replace=False)]
    ours = km.kmeans(x, 10, 1, KEY, init=c0)
    ref = KMeans(10, init=c0, n_init=1, max_iter=1, algorithm="lloyd").fit(x)
    assert np.abs(np.asarray(ours.centroids) - ref.cluster_centers_).max() <= 1e-5
    np.testing.assert_array_equal(np.asarray(ours.assignments), ref.labels_)
    assert float(ours.inertia) == pytest.approx(ref.inertia_, rel=1e-5)


def test_nearest_takes_the_lowest_index_on_ties():
    """Exact ties (duplicated centroids) go to the first one, as np.argmin; NaN rows stay in range."""
    x = _blobs(n=300, seed=10)
    c = x[[5, 6, 7, 5, 8, 6]]  # centroids 3 and 5 duplicate 0 and 1
    x[0] = np.nan
    assign, dist = km._nearest(jnp.asarray(x), km._augment(jnp.asarray(c)), jax.lax.Precision.HIGHEST)
    d = ((x[1:, None].astype(np.float64) - c[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.asarray(assign)[1:], d.argmin(axis=1))
    assert set(np.asarray(assign)[1:]) == {0, 1, 2, 4} and 0 <= int(assign[0]) < 6
    np.testing.assert_allclose(np.asarray(dist)[1:], d.min(axis=1), rtol=1e-4, atol=1e-4)


def test_twenty_iterations_reach_sklearn_inertia():
    x = _blobs(seed=2)
    c0 = x[np.random.default_rng(3).choice(len(x), 10, replace=False)]
    ours = km.kmeans(x, 10, 20, KEY, init=c0)
    ref = KMeans(10, init=c0, n_init=1, max_iter=20, tol=0, algorithm="lloyd").fit(x)
    assert float(ours.inertia) <= ref.inertia_ * 1.01
    assert float(ours.inertia) == pytest.approx(_exact_inertia(x, ours), rel=1e-4)
    _check_sizes(ours, len(x), 10)


def test_empty_clusters_are_reseeded_during_iterations():
    x = _blobs(seed=4)
    c0 = np.concatenate([x[:6], np.full((4, 8), 1e3, np.float32)])  # 4 centroids nobody is near
    result = km.kmeans(x, 10, 5, KEY, init=c0)
    _check_sizes(result, len(x), 10)
    assert np.abs(np.asarray(result.centroids)).max() < 100  # the far centroids were replaced


@pytest.mark.parametrize("num_iters", [0, 3])
def test_duplicated_points_leave_no_empty_cluster(num_iters):
    """16 rows, only 4 distinct, K=16: each cluster must end with exactly one row."""
    x = np.repeat(_blobs(n=4, d=8, seed=5), 4, axis=0)
    result = km.kmeans(x, 16, num_iters, KEY, init=np.repeat(x[:1], 16, axis=0))
    _check_sizes(result, 16, 16)
    assert np.all(np.asarray(result.cluster_sizes) == 1)
    assert float(result.inertia) == pytest.approx(_exact_inertia(x, result), abs=1e-3)


@pytest.mark.slow
def test_sharded_with_padding_equals_unsharded():
    x = _blobs(n=1001)  # 1001 rows: 7 padded rows over 8 devices
    mesh = _mesh()
    xs, valid = _shard(x, mesh)
    ours = km.kmeans(x, 12, 8, KEY)
    sharded = km.kmeans(xs, 12, 8, KEY, valid=valid)
    assert sharded.assignments.sharding.spec == P("data")
    assignments = np.asarray(sharded.assignments)
    np.testing.assert_array_equal(assignments[:1001], np.asarray(ours.assignments))
    assert np.all(assignments[1001:] == -1)
    np.testing.assert_allclose(np.asarray(sharded.centroids), np.asarray(ours.centroids), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(sharded.cluster_sizes), np.asarray(ours.cluster_sizes))
    assert float(sharded.inertia) == pytest.approx(float(ours.inertia), rel=1e-5)
    _check_sizes(sharded, 1001, 12)


def test_random_init_is_deterministic_and_uses_distinct_valid_rows():
    x = _blobs(n=1001)
    xs, valid = _shard(x, _mesh())
    first = km.kmeans(xs, 12, 0, KEY, valid=valid)
    again = km.kmeans(xs, 12, 0, KEY, valid=valid)
    np.testing.assert_array_equal(np.asarray(first.centroids), np.asarray(again.centroids))
    other = km.kmeans(xs, 12, 0, jax.random.key(1), valid=valid)
    assert not np.array_equal(np.asarray(first.centroids), np.asarray(other.centroids))
    rows = [np.flatnonzero((x == c).all(axis=1)) for c in np.asarray(first.centroids)]
    assert all(len(r) == 1 for r in rows) and len({int(r[0]) for r in rows}) == 12


def test_small_chunks_equal_one_chunk():
    x = _blobs(seed=6)
    c0 = x[:10]
    whole = km.kmeans(x, 10, 6, KEY, init=c0, chunk_size=1000)
    chunked = km.kmeans(x, 10, 6, KEY, init=c0, chunk_size=37)  # 27 chunks and a remainder of 1
    np.testing.assert_array_equal(np.asarray(chunked.assignments), np.asarray(whole.assignments))
    np.testing.assert_allclose(np.asarray(chunked.centroids), np.asarray(whole.centroids), atol=1e-5)


@pytest.mark.slow
def test_kmeanspp_seeding():
    x = _blobs(n=1001, seed=7)
    xs, valid = _shard(x, _mesh())
    plus = km.kmeans(xs, 12, 0, KEY, init="kmeans++", valid=valid)
    unsharded = km.kmeans(x, 12, 0, KEY, init="kmeans++")
    np.testing.assert_array_equal(np.asarray(plus.centroids), np.asarray(unsharded.centroids))
    rows = {int(np.flatnonzero((x == c).all(axis=1))[0]) for c in np.asarray(plus.centroids)}
    assert len(rows) == 12  # distinct data rows
    random = km.kmeans(xs, 12, 0, KEY, valid=valid)
    assert float(plus.inertia) < float(random.inertia)


@pytest.mark.slow
def test_compiled_kmeans_never_gathers_the_rows():
    n = 800
    xs, valid = _shard(_blobs(n=n, d=16), _mesh())
    ids = jax.device_put(jnp.arange(n, dtype=jnp.int32), NamedSharding(_mesh(), P("data")))
    hlo = km._kmeans_jit.lower(xs, valid, ids, KEY, None, 2, mesh=_mesh(), num_clusters=10,
                               init="random", chunk_size=32,
                               precision=jax.lax.Precision.HIGHEST).compile().as_text()
    gathered = re.findall(r"= \w+\[([\d,]*)\][^=]*all-gather\(", hlo)
    assert gathered  # the candidate rows of the random init
    assert all(np.prod([int(s) for s in shape.split(",") if s]) < n for shape in gathered)


def test_fixed_point_limbs_without_a_concatenation():
    """The limbs as one broadcast shift: the same integers as stacking one limb at a time, whose concatenation
    XLA:CPU compiled into the slowest operation of a Lloyd step (BENCHMARKS.md, k-means)."""
    x = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (300, 17)).astype(np.float32))
    x = x.at[0, :3].set(jnp.array([-1.0, 1.0, 0.0]))  # the ends of the fixed-point range
    scale = jnp.max(jnp.abs(x))
    q = jnp.round(x / scale * 2.0 ** km.FIXED_POINT_BITS).astype(jnp.int32) + 2 ** km.FIXED_POINT_BITS
    stacked = jnp.stack([(q >> (km.LIMB_BITS * i)) & (2 ** km.LIMB_BITS - 1) for i in range(km.LIMBS)], axis=-1)
    limbs = km._fixed_point_limbs(x, scale)
    np.testing.assert_array_equal(limbs, stacked)
    np.testing.assert_array_equal(jnp.sum(limbs * 2 ** (km.LIMB_BITS * jnp.arange(km.LIMBS)), axis=-1), q)
    assert " concatenate(" not in jax.jit(km._fixed_point_limbs).lower(x, scale).compile().as_text()


def test_invalid_arguments():
    x = _blobs(n=20)
    with pytest.raises(ValueError, match="at least num_clusters=30"):
        km.kmeans(x, 30, 1, KEY)
    with pytest.raises(ValueError, match="init must be one of"):
        km.kmeans(x, 5, 1, KEY, init="forgy")
    with pytest.raises(ValueError, match="init centroids must have shape"):
        km.kmeans(x, 5, 1, KEY, init=x[:4])


def _numpy_whiten(x, dim):
    xc = x.astype(np.float64) - x.mean(axis=0)
    evals, evecs = np.linalg.eigh(xc.T @ xc / len(x))
    order = np.argsort(evals)[::-1][:dim]
    return xc @ evecs[:, order] / np.sqrt(evals[order])


def test_pca_whitening_matches_numpy():
    rng = np.random.default_rng(8)
    x = (rng.normal(size=(2000, 12)) * np.linspace(0.5, 5, 12) @ rng.normal(size=(12, 12)) + 3)
    x = x.astype(np.float32)
    ours = np.asarray(km.pca_whiten(x, 6).features, np.float64)
    ref = _numpy_whiten(x, 6)
    ours *= np.sign(np.sum(ours * ref, axis=0))  # eigenvectors are defined up to sign
    np.testing.assert_allclose(ours, ref, atol=2e-3)
    np.testing.assert_allclose(ours.T @ ours / len(x), np.eye(6), atol=2e-3)
    assert km.pca_whiten(x, 50).features.shape == (2000, 12)  # pca_dim above D keeps all D components


def test_preprocessing_sharded_with_padding():
    x = _blobs(n=1001, d=16, seed=9)
    xs, valid = _shard(x, _mesh())
    out = km.preprocess_features(xs, 8, valid=valid).features
    assert out.sharding.spec == P("data", None)
    out = np.asarray(out)
    np.testing.assert_allclose(out[:1001], np.asarray(km.preprocess_features(x, 8).features), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out[:1001], axis=1), 1.0, rtol=1e-5)
    assert np.all(out[1001:] == 0)
    plain = np.asarray(km.preprocess_features(x, 0).features)
    np.testing.assert_allclose(plain, x / np.linalg.norm(x, axis=1, keepdims=True), rtol=1e-5)


def test_the_same_rows_in_another_layout_cluster_alike_when_drawn_by_id():
    """The feature pass lays rows out in a device-count-dependent order: with the rows' ids, k-means
    (random and k-means++ seeding) gives each row the same cluster whatever the order."""
    x = _blobs(n=600, seed=11)
    perm = np.random.default_rng(0).permutation(600)
    for init in ("random", "kmeans++"):
        plain = km.kmeans(x, 12, 5, KEY, init=init)
        shuffled = km.kmeans(x[perm], 12, 5, KEY, init=init, ids=perm)
        np.testing.assert_array_equal(np.asarray(shuffled.assignments)[np.argsort(perm)], np.asarray(plain.assignments))
        np.testing.assert_array_equal(np.asarray(shuffled.centroids), np.asarray(plain.centroids))
        by_row = km.kmeans(x[perm], 12, 5, KEY, init=init)  # drawn by row index instead: another clustering
        assert not np.array_equal(np.asarray(by_row.centroids), np.asarray(plain.centroids))


def test_pca_eigen_floor_is_an_option_and_counts_what_it_floors():
    rng = np.random.default_rng(12)
    x = (rng.normal(size=(500, 8)) @ np.diag([10, 5, 3, 1, 1, 1e-4, 1e-4, 1e-4])).astype(np.float32)
    default = km.pca_whiten(x, 8)
    assert int(default.floored) == 3  # eigenvalues ~1e-8 of ~100: below 1e-5 x the largest
    none = km.pca_whiten(x, 8, eigen_floor=0.0)
    assert int(none.floored) == 0
    np.testing.assert_allclose(np.asarray(none.features)[:, :5], np.asarray(default.features)[:, :5], rtol=1e-4)
    # without a floor the smallest components are whitened to unit variance, as faiss does
    np.testing.assert_allclose(np.var(np.asarray(none.features, np.float64)[:, 7]), 1.0, rtol=0.05)
    assert np.var(np.asarray(default.features, np.float64)[:, 7]) < 0.1
    assert int(km.preprocess_features(x, 0).floored) == 0
