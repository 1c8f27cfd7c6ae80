"""Losses against independent float64 numpy implementations written from the formulas of DIFFERENCES.md, losses and diagnostics."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from spcl_jax import losses

RTOL = 1e-5
SHAPES = [(2, 3), (5, 16), (16, 128)]


# ---------------------------------------------------------------- float64 references (loops, the formulas of DIFFERENCES.md)


def ref_normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def ref_logsumexp(values):
    values = np.asarray(values, np.float64)
    top = values.max()
    return top + np.log(np.sum(np.exp(values - top)))


def ref_nt_xent(z_a, z_b, temperature):
    """DIFFERENCES.md, losses (NT-Xent): four similarity matrices, anchor a_k and b_k each with one positive and 2B-2 negatives."""
    a, b = ref_normalize(np.float64(z_a)), ref_normalize(np.float64(z_b))
    n = len(a)
    anchor_losses = []
    for k in range(n):
        for own, other in ((a, b), (b, a)):
            positive = own[k] @ other[k] / temperature
            negatives = [own[k] @ own[j] / temperature for j in range(n) if j != k]
            negatives += [own[k] @ other[j] / temperature for j in range(n) if j != k]
            anchor_losses.append(ref_logsumexp([positive] + negatives) - positive)
    return np.mean(anchor_losses)


def ref_softmax(row):
    row = np.float64(row)
    e = np.exp(row - row.max())
    return e / e.sum()


def ref_prototype(logits, labels, kind="CE", alpha=0.1, beta=1.0):
    logits = np.float64(logits)
    ce, rce = [], []
    for row, label in zip(logits, labels):
        p = ref_softmax(row)
        ce.append(-np.log(p[label]))
        one_hot = np.clip(np.eye(len(row))[label], 1e-4, 1.0)
        rce.append(-np.sum(np.clip(p, 1e-7, 1.0) * np.log(one_hot)))
    if kind == "CE":
        return np.mean(ce)
    return alpha * np.mean(ce) + beta * np.mean(rce)


def ref_metric(logits, targets, kind="BCE"):
    x, t = np.float64(logits).reshape(-1), np.float64(targets).reshape(-1)
    if kind == "BCE":
        sigmoid = 1 / (1 + np.exp(-x))
        return np.mean(-(t * np.log(sigmoid) + (1 - t) * np.log(1 - sigmoid)))
    if kind == "L1":
        return np.mean(np.abs(x - t))
    return np.mean((x - t) ** 2)


def ref_siamese(w, bias, h_i, h_j, v_i, v_j, similarity, kind="BCE"):
    def metric(x, y):
        return np.abs(np.float64(x) - np.float64(y)) @ np.float64(w) + bias

    s = np.float64(similarity).reshape(-1)
    ones = np.ones_like(s)
    total = ref_metric(metric(h_i, h_j), ones, kind) + ref_metric(metric(v_i, v_j), ones, kind)
    for x, y in itertools.product((h_i, h_j), (v_i, v_j)):
        total += ref_metric(metric(x, y), s, kind)
    return total


def ref_diagnostics(z_a, z_b, labels, temperature):
    """DIFFERENCES.md, diagnostics, with explicit loops over the four similarity blocks."""
    a, b = ref_normalize(np.float64(z_a)), ref_normalize(np.float64(z_b))
    blocks = {"aa": a @ a.T, "ab": a @ b.T, "ba": b @ a.T, "bb": b @ b.T}
    blocks = {name: m / temperature for name, m in blocks.items()}
    n = len(labels)
    pos, neg, fn = [], [], []
    for name, m in blocks.items():
        for i in range(n):
            for j in range(n):
                if labels[i] != labels[j]:
                    neg.append(m[i, j])
                elif i != j:
                    fn.append(m[i, j])
                if labels[i] == labels[j] and name in ("ab", "ba"):
                    pos.append(m[i, j])
    same_pairs = sum(labels[i] == labels[j] for i in range(n) for j in range(n) if i != j)
    return {
        "false_negative_fraction": same_pairs / (n * (n - 1)),
        "pos_similarity": np.mean(pos),
        "true_neg_similarity": np.mean(neg) if neg else 0.0,
        "false_neg_similarity": np.mean(fn) if fn else 0.0,
        "false_neg_count": len(fn),
        "true_pos_similarity": np.mean(np.concatenate([np.diag(blocks["ab"]), np.diag(blocks["ba"])])),
    }


# ---------------------------------------------------------------- helpers

# Jitted entry points: one compilation per shape instead of one per primitive and shape (eager mode).
nt_xent = jax.jit(losses.nt_xent, static_argnums=2)
prototype_loss = jax.jit(losses.prototype_loss, static_argnums=(2, 3, 4))
metric_loss = jax.jit(losses.metric_loss, static_argnums=2)


def assert_close(actual, expected, rtol=RTOL):
    np.testing.assert_allclose(np.float64(actual), expected, rtol=rtol, atol=0)


def assert_all_finite(tree):
    for leaf in jax.tree.leaves(tree):
        assert np.all(np.isfinite(np.asarray(leaf, np.float64))), leaf


def linear_metric(w, bias):
    return lambda d: d @ w + bias


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", [0.5, 0.1])
def test_nt_xent_matches_reference(shape, temperature):
    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    z_a, z_b = rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)
    assert_close(nt_xent(z_a, z_b, temperature), ref_nt_xent(z_a, z_b, temperature))


@pytest.mark.parametrize("kind", ["CE", "SCE"])
@pytest.mark.parametrize("batch,classes", [(2, 3), (7, 10), (32, 512)])
def test_prototype_loss_matches_reference(kind, batch, classes):
    rng = np.random.default_rng(batch + classes)
    logits = (3 * rng.normal(size=(batch, classes))).astype(np.float32)
    labels = rng.integers(0, classes, size=batch)
    assert_close(prototype_loss(logits, labels, kind), ref_prototype(logits, labels, kind))


def test_sce_alpha_beta_and_closed_form():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=6)
    got = prototype_loss(logits, labels, "SCE", 0.3, 2.0)
    assert_close(got, ref_prototype(logits, labels, "SCE", alpha=0.3, beta=2.0))
    # RCE reduces to -log(1e-4) * (1 - p_y) up to the 1e-7 clamp (DIFFERENCES.md, losses).
    p_y = np.array([ref_softmax(r)[y] for r, y in zip(logits, labels)])
    rce = prototype_loss(logits, labels, "SCE", 0.0, 1.0)
    assert_close(rce, -np.log(1e-4) * np.mean(1 - p_y), rtol=1e-4)


@pytest.mark.parametrize("kind", ["BCE", "L1", "L2"])
@pytest.mark.parametrize("shape", [(2,), (9, 1), (64, 1)])
def test_metric_loss_matches_reference(kind, shape):
    rng = np.random.default_rng(shape[0])
    logits = (2 * rng.normal(size=shape)).astype(np.float32)
    targets = rng.integers(0, 2, size=shape).astype(np.float32)
    assert_close(metric_loss(logits, targets, kind), ref_metric(logits, targets, kind))


@pytest.mark.parametrize("kind", ["BCE", "L1", "L2"])
@pytest.mark.parametrize("batch,dim", [(2, 3), (8, 32)])
def test_siamese_metric_loss_matches_reference(kind, batch, dim):
    rng = np.random.default_rng(batch * dim)
    h_i, h_j, v_i, v_j = (rng.normal(size=(batch, dim)).astype(np.float32) for _ in range(4))
    w = (0.3 * rng.normal(size=(dim, 1))).astype(np.float32)
    bias = np.float32(0.1)
    similarity = rng.integers(0, 2, size=(batch, 1)).astype(np.float32)
    got = losses.siamese_metric_loss(linear_metric(w, bias), h_i, h_j, v_i, v_j, similarity, kind)
    assert_close(got, ref_siamese(w, bias, h_i, h_j, v_i, v_j, similarity, kind))


def _spcl_batch(rng, batch=6, dim=8, proj=4, k=5):
    z = [rng.normal(size=(batch, proj)).astype(np.float32) for _ in range(4)]
    h = [rng.normal(size=(batch, dim)).astype(np.float32) for _ in range(4)]
    logits = tuple(rng.normal(size=(batch, k)).astype(np.float32) for _ in range(4))
    labels_a, labels_b = rng.integers(0, k, size=batch), rng.integers(0, k, size=batch)
    similarity = rng.integers(0, 2, size=batch).astype(np.float32)
    w = (0.2 * rng.normal(size=(dim, 1))).astype(np.float32)
    return z, h, logits, labels_a, labels_b, similarity, w


@pytest.mark.parametrize("cluster_loss", ["CE", "SCE"])
def test_spcl_objective_combines_terms(cluster_loss):
    rng = np.random.default_rng(1)
    z, h, logits, labels_a, labels_b, similarity, w = _spcl_batch(rng)
    weights = dict(contras_weight=1.5, metric_weight=0.3, cluster_weight=0.7)
    total, terms = losses.spcl_objective(
        *z, *h, logits, labels_a, labels_b, similarity, linear_metric(w, 0.0),
        temperature=0.5, cluster_loss=cluster_loss, **weights,
    )
    contrastive = ref_nt_xent(z[0], z[1], 0.5) + ref_nt_xent(z[2], z[3], 0.5)
    metric = ref_siamese(w, 0.0, *h, similarity)
    view_labels = (labels_a, labels_a, labels_b, labels_b)
    prototype = sum(ref_prototype(y, c, cluster_loss) for y, c in zip(logits, view_labels))
    assert set(terms) == {"contrastive", "metric", "prototype"}
    assert_close(terms["contrastive"], contrastive)
    assert_close(terms["metric"], metric)
    assert_close(terms["prototype"], prototype)
    assert_close(total, 1.5 * contrastive + 0.3 * metric + 0.7 * prototype)


def test_spcl_objective_method_subsets():
    rng = np.random.default_rng(2)
    z, h, logits, labels_a, labels_b, similarity, w = _spcl_batch(rng)
    simclr_total, simclr_terms = losses.spcl_objective(z[0], z[1], temperature=0.5)
    assert set(simclr_terms) == {"contrastive"}
    assert_close(simclr_total, ref_nt_xent(z[0], z[1], 0.5))

    cluster_total, cluster_terms = losses.spcl_objective(
        z[0], z[1], logits=logits[:2], labels_a=labels_a, temperature=0.5, cluster_weight=2.0
    )
    prototype = ref_prototype(logits[0], labels_a) + ref_prototype(logits[1], labels_a)
    assert set(cluster_terms) == {"contrastive", "prototype"}
    assert_close(cluster_total, ref_nt_xent(z[0], z[1], 0.5) + 2.0 * prototype)

    metric_total, metric_terms = losses.spcl_objective(
        *z, *h, similarity=similarity, metric_fn=linear_metric(w, 0.0), temperature=0.5, metric_weight=1.0,
        logits=logits, cluster_weight=0.0,
    )
    assert set(metric_terms) == {"contrastive", "metric"}
    expected = ref_nt_xent(z[0], z[1], 0.5) + ref_nt_xent(z[2], z[3], 0.5) + ref_siamese(w, 0.0, *h, similarity)
    assert_close(metric_total, expected)


def test_spcl_objective_rejects_missing_inputs():
    z = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="metric"):
        losses.spcl_objective(z, z, temperature=0.5, metric_weight=1.0)
    with pytest.raises(ValueError, match="cluster"):
        losses.spcl_objective(z, z, temperature=0.5, cluster_weight=1.0)
    with pytest.raises(ValueError, match="cluster"):
        losses.spcl_objective(z, z, logits=(z, z, z, z), labels_a=np.zeros(2, np.int32), temperature=0.5,
                              cluster_weight=1.0)
    with pytest.raises(ValueError, match="z_vj"):
        losses.spcl_objective(z, z, z, temperature=0.5)
    with pytest.raises(ValueError, match="kind"):
        losses.prototype_loss(z, np.zeros(2, np.int32), "MSE")
    with pytest.raises(ValueError, match="kind"):
        losses.metric_loss(z[:, 0], z[:, 0], "SCE")


@pytest.mark.parametrize("labels", [[0, 1, 0, 2, 1, 0], [0, 1, 2, 3], [3, 3, 3]])
def test_contrastive_diagnostics_match_reference(labels):
    labels = np.array(labels)
    rng = np.random.default_rng(len(labels))
    z_a, z_b = (rng.normal(size=(len(labels), 8)).astype(np.float32) for _ in range(2))
    got = jax.jit(losses.contrastive_diagnostics, static_argnums=3)(z_a, z_b, labels, 0.5)
    expected = ref_diagnostics(z_a, z_b, labels, 0.5)
    assert set(got) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(np.float64(got[name]), value, rtol=RTOL, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------- gradients


def _gradient_case(name, rng):
    """(function, float64 arguments) of one loss, built inside the x64 context."""

    def f64(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float64)

    def binary(*shape):
        return jnp.asarray(rng.integers(0, 2, size=shape), jnp.float64)

    if name == "nt_xent":
        return (lambda a, b: losses.nt_xent(a, b, 0.2)), (f64(4, 6), f64(4, 6))
    if name in ("CE", "SCE"):
        labels = jnp.asarray(rng.integers(0, 7, size=5))
        return (lambda y: losses.prototype_loss(y, labels, name)), (f64(5, 7),)
    if name in ("BCE", "L1", "L2"):
        targets = binary(6, 1)
        return (lambda y: losses.metric_loss(y, targets, name)), (f64(6, 1),)
    similarity = binary(4)
    return (
        lambda w, *features: losses.siamese_metric_loss(linear_metric(w, 0.0), *features, similarity),
        (f64(5, 1), f64(4, 5), f64(4, 5), f64(4, 5), f64(4, 5)),
    )


@pytest.mark.parametrize("name", ["nt_xent", "CE", "SCE", "BCE", "L1", "L2", "siamese"])
def test_gradients_match_finite_differences_in_float64(name):
    with jax.enable_x64(True):
        fn, args = _gradient_case(name, np.random.default_rng(3))
        check_grads(jax.jit(fn), args, order=1, modes=("rev",))


# ---------------------------------------------------------------- numerical stability


def _grads_finite(fn, *args):
    value, grads = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(args)))))(*args)
    assert_all_finite((value, grads))


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_nt_xent_stable(batch):
    rng = np.random.default_rng(batch)
    big = (1e4 * rng.normal(size=(batch, 8))).astype(np.float32)
    identical = np.tile(big[:1], (batch, 1))
    zeros = np.zeros((batch, 8), np.float32)
    cases = [(big, big), (identical, identical), (big, -big), (zeros, big), (zeros, zeros)]
    z_a, z_b = np.stack([a for a, _ in cases]), np.stack([b for _, b in cases])
    loss_and_grads = jax.vmap(jax.value_and_grad(lambda a, b: losses.nt_xent(a, b, 0.05), argnums=(0, 1)))
    assert_all_finite(jax.jit(loss_and_grads)(z_a, z_b))


def test_identical_rows_give_the_closed_form():
    # All rows equal: every logit is 1/tau, so each anchor's loss is log(2B - 1).
    z = np.ones((3, 4), np.float32)
    assert_close(nt_xent(z, z, 0.05), np.log(5.0))


def test_prototype_and_metric_losses_stable_at_large_logits():
    rng = np.random.default_rng(4)
    logits = (1e4 * rng.normal(size=(2, 6))).astype(np.float32)
    labels = np.array([0, 5])
    for kind in ("CE", "SCE"):
        _grads_finite(lambda y: losses.prototype_loss(y, labels, kind), logits)
    metric_logits = np.array([1e4, -1e4, 3e4, -3e4], np.float32)
    for kind in ("BCE", "L1", "L2"):
        for targets in (np.array([0, 1, 1, 0], np.float32), np.array([1, 0, 1, 0], np.float32)):
            _grads_finite(lambda y: losses.metric_loss(y, targets, kind), metric_logits)
    confident = metric_loss(metric_logits, np.array([1, 0, 1, 0], np.float32), "BCE")
    np.testing.assert_allclose(np.float64(confident), 0.0, atol=1e-6)


def test_spcl_objective_stable_with_identical_features():
    z = np.ones((2, 4), np.float32)
    h = 1e4 * np.ones((2, 8), np.float32)
    logits = (1e4 * np.ones((2, 3), np.float32),) * 4
    labels = np.array([0, 2])
    w = 0.01 * np.ones((8, 1), np.float32)

    def objective(z_hi, h_i, w):
        total, _ = losses.spcl_objective(
            z_hi, z, z, z, h_i, h, h, h, logits, labels, labels, np.array([1.0, 0.0]), linear_metric(w, 0.0),
            temperature=0.05, metric_weight=1.0, cluster_weight=1.0, cluster_loss="SCE",
        )
        return total

    _grads_finite(objective, z, h, w)


# ---------------------------------------------------------------- sharded global batch


def test_nt_xent_sharded_over_8_devices_uses_the_global_batch():
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P("data"))
    rng = np.random.default_rng(5)
    z_a, z_b = (rng.normal(size=(32, 16)).astype(np.float32) for _ in range(2))
    sharded_a, sharded_b = jax.device_put(z_a, sharding), jax.device_put(z_b, sharding)
    assert {shard.data.shape for shard in sharded_a.addressable_shards} == {(4, 16)}

    loss = jax.jit(losses.nt_xent, static_argnums=2)(sharded_a, sharded_b, 0.5)
    expected = ref_nt_xent(z_a, z_b, 0.5)
    assert_close(loss, expected)
    per_shard = np.mean([ref_nt_xent(z_a[i : i + 4], z_b[i : i + 4], 0.5) for i in range(0, 32, 4)])
    assert abs(per_shard - expected) > 0.1  # contrasting within each shard only would be a different loss
