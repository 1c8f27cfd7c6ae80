"""SPCL losses and contrastive diagnostics as pure functions (DIFFERENCES.md, losses and diagnostics).

Inputs of lower precision are promoted to float32 (float64 stays float64), so the losses never run in bfloat16.
Called on globally sharded arrays inside `jax.jit`, every batch reduction (the NT-Xent negatives included) spans
the global batch.
"""
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

CLUSTER_LOSSES = ("CE", "SCE")
METRIC_LOSSES = ("BCE", "L1", "L2")


def _at_least_f32(x):
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def l2_normalize(x: ArrayLike, eps: float = 1e-12) -> jax.Array:
    """Rows divided by max(||x||, eps), as torch F.normalize; the gradient stays finite at x = 0."""
    x = _at_least_f32(x)
    squared_norm = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared_norm, eps * eps))


def _similarity_logits(z_a, z_b, temperature):
    """(2B, 2B) cosine similarities / temperature, blocks [[aa, ab], [ba, bb]]."""
    z = jnp.concatenate([l2_normalize(z_a), l2_normalize(z_b)])
    return jnp.matmul(z, z.T, precision=jax.lax.Precision.HIGHEST) / temperature


def nt_xent(z_a: jax.Array | np.ndarray, z_b: jax.Array | np.ndarray, temperature: float) -> jax.Array:
    """SimCLR NT-Xent: each of the 2B anchors has its other view as positive and the other 2B-2 rows as negatives.

    The self-similarity is masked with -inf inside a logsumexp, which cannot produce NaN (every row keeps its
    positive). Returns the mean over the 2B anchors.
    """
    logits = _similarity_logits(z_a, z_b, temperature)
    b = z_a.shape[0]
    masked = jnp.where(jnp.eye(2 * b, dtype=bool), -jnp.inf, logits)
    positives = jnp.concatenate([jnp.diagonal(logits, offset=b), jnp.diagonal(logits, offset=-b)])
    return jnp.mean(jax.nn.logsumexp(masked, axis=-1) - positives)


def cross_entropy(logits: ArrayLike, labels: jax.Array | np.ndarray) -> jax.Array:
    """Mean softmax cross-entropy of integer labels (torch nn.CrossEntropyLoss)."""
    log_probs = jax.nn.log_softmax(_at_least_f32(logits), axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))


def prototype_loss(logits: ArrayLike, labels: jax.Array | np.ndarray, kind: str = "CE", alpha: float = 0.1,
                   beta: float = 1.0) -> jax.Array:
    """Prototype classification loss: "CE", or "SCE" = alpha*CE + beta*mean(RCE) with the original's clamps.

    RCE = -sum_k clip(softmax, 1e-7, 1)_k * log(clip(onehot, 1e-4, 1)_k); logits are (B, K), labels (B,) in [0, K).
    """
    if kind == "CE":
        return cross_entropy(logits, labels)
    if kind != "SCE":
        raise ValueError(f"prototype loss kind {kind!r} not in {CLUSTER_LOSSES}")
    logits = _at_least_f32(logits)
    probs = jnp.clip(jax.nn.softmax(logits, axis=-1), 1e-7, 1.0)
    one_hot = jnp.clip(jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype), 1e-4, 1.0)
    reverse = -jnp.sum(probs * jnp.log(one_hot), axis=-1)
    return alpha * cross_entropy(logits, labels) + beta * jnp.mean(reverse)


def metric_loss(logits: ArrayLike, targets: ArrayLike, kind: str = "BCE") -> jax.Array:
    """Mean per-pair loss of metric logits (B,) or (B, 1) against 0/1 targets: "BCE" (with logits), "L1" or "L2"."""
    x = _at_least_f32(logits).reshape(-1)
    t = jnp.asarray(targets).reshape(-1).astype(x.dtype)
    if x.shape != t.shape:
        raise ValueError(f"metric logits {jnp.shape(logits)} and targets {jnp.shape(targets)} differ in size")
    if kind == "BCE":
        per_pair = jnp.maximum(x, 0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))
    elif kind == "L1":
        per_pair = jnp.abs(x - t)
    elif kind == "L2":
        per_pair = jnp.square(x - t)
    else:
        raise ValueError(f"metric loss kind {kind!r} not in {METRIC_LOSSES}")
    return jnp.mean(per_pair)


def siamese_metric_loss(metric_fn: Callable[[jax.Array], jax.Array], h_i: ArrayLike, h_j: ArrayLike, v_i: ArrayLike,
                        v_j: ArrayLike, similarity: ArrayLike, kind: str = "BCE") -> jax.Array:
    """Sum of the six pair terms of the siamese metric loss (DIFFERENCES.md, losses) on encoder features.

    The same-image view pairs (h_i, h_j) and (v_i, v_j) have target 1; the four cross-image pairs (h_i, v_i),
    (h_i, v_j), (h_j, v_i), (h_j, v_j) have the pair's similarity label (B,) or (B, 1). `metric_fn` maps
    |x - y| (B, D) to logits (B,) or (B, 1), e.g. `MetricLearner.from_difference`.
    """
    similarity = jnp.asarray(similarity).reshape(-1)
    same_image = jnp.ones_like(similarity)
    pairs = (
        (h_i, h_j, same_image),
        (v_i, v_j, same_image),
        (h_i, v_i, similarity),
        (h_i, v_j, similarity),
        (h_j, v_i, similarity),
        (h_j, v_j, similarity),
    )
    return sum(metric_loss(metric_fn(jnp.abs(x - y)), target, kind) for x, y, target in pairs)


def spcl_objective(
    z_hi: jax.Array | np.ndarray,
    z_hj: jax.Array | np.ndarray,
    z_vi: jax.Array | np.ndarray | None = None,
    z_vj: jax.Array | np.ndarray | None = None,
    h_i: ArrayLike | None = None,
    h_j: ArrayLike | None = None,
    v_i: ArrayLike | None = None,
    v_j: ArrayLike | None = None,
    logits: Sequence[ArrayLike] | None = None,
    labels_a: jax.Array | np.ndarray | None = None,
    labels_b: jax.Array | np.ndarray | None = None,
    similarity: ArrayLike | None = None,
    metric_fn: Callable[[jax.Array], jax.Array] | None = None,
    *,
    temperature: float,
    contras_weight: float | None = 1.0,
    metric_weight: float | None = 0.0,
    cluster_weight: float | None = 0.0,
    cluster_loss: str = "CE",
    metric_loss_kind: str = "BCE",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """λ_c·L_con + λ_m·L_metric + λ_p·L_proto (DIFFERENCES.md, losses) for every pretraining method.

    Image set A has views (z_hi, z_hj) / features (h_i, h_j), set B (z_vi, z_vj) / (v_i, v_j); B is absent in
    `simclr` and `cluster`. Terms:
      * contrastive: NT-Xent(z_hi, z_hj) [+ NT-Xent(z_vi, z_vj) when set B is given]; negatives stay in each set.
      * metric: `siamese_metric_loss(metric_fn, h_i, h_j, v_i, v_j, similarity, metric_loss_kind)`.
      * prototype: `logits` = (y_hi, y_hj) with `labels_a`, or (y_hi, y_hj, y_vi, y_vj) with `labels_a`, `labels_b`;
        sum of `prototype_loss(y, labels, cluster_loss)` over the views.
    The weights are static Python numbers; a term whose weight is 0 or None is skipped (its inputs may be None),
    a weighted term with missing inputs raises ValueError. Returns (total, terms) where `terms` maps each computed
    term name ("contrastive", "metric", "prototype") to its unweighted value.
    """
    has_set_b = z_vi is not None or z_vj is not None
    if contras_weight and has_set_b and (z_vi is None or z_vj is None):
        raise ValueError("contrastive term of image set B needs both z_vi and z_vj")
    if metric_weight and (metric_fn is None or similarity is None or any(h is None for h in (h_i, h_j, v_i, v_j))):
        raise ValueError("metric_weight is set but metric_fn, similarity or h_i/h_j/v_i/v_j is missing")
    if cluster_weight and (
        logits is None or len(logits) not in (2, 4) or labels_a is None or (len(logits) == 4 and labels_b is None)
    ):
        raise ValueError("cluster_weight is set but logits (2 or 4 views) or their labels are missing")

    terms = {}
    if contras_weight:
        terms["contrastive"] = nt_xent(z_hi, z_hj, temperature)
        if has_set_b:
            terms["contrastive"] += nt_xent(z_vi, z_vj, temperature)
    if metric_weight:
        terms["metric"] = siamese_metric_loss(metric_fn, h_i, h_j, v_i, v_j, similarity, metric_loss_kind)
    if cluster_weight:
        view_labels = (labels_a, labels_a, labels_b, labels_b)[: len(logits)]
        terms["prototype"] = sum(prototype_loss(y, c, cluster_loss) for y, c in zip(logits, view_labels))
    weights = {"contrastive": contras_weight, "metric": metric_weight, "prototype": cluster_weight}
    total = sum((weights[name] * value for name, value in terms.items()), jnp.zeros(()))
    return total, terms


def _masked_mean(values, mask):
    """Mean of the masked entries, 0 (not NaN) when the mask is empty."""
    return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def _on_all_blocks(mask):
    """A (B, B) mask repeated on the four blocks of the (2B, 2B) similarity matrix."""
    return jnp.tile(mask, (2, 2))


def contrastive_diagnostics(z_a: jax.Array | np.ndarray, z_b: jax.Array | np.ndarray, labels: jax.Array | np.ndarray,
                            temperature: float) -> dict[str, jax.Array]:
    """False-negative statistics of one NT-Xent batch (DIFFERENCES.md, diagnostics and B-21), vectorised.

    With S = cosine/temperature over [a; b] and "same" = equal labels (B,):
      * false_negative_fraction: fraction of ordered pairs i != j with the same label;
      * pos_similarity: mean of S_ab and S_ba over same-label entries, diagonal positives included;
      * true_neg_similarity: mean of S_aa, S_ab, S_ba, S_bb over different-label entries;
      * false_neg_similarity / false_neg_count: mean and number of those four blocks' same-label off-diagonal
        entries (0 when there are none);
      * true_pos_similarity: mean of the 2B positive logits.
    """
    b = z_a.shape[0]
    logits = _similarity_logits(z_a, z_b, temperature)
    same = labels[:, None] == labels[None, :]
    false_negative = same & ~jnp.eye(b, dtype=bool)
    cross_blocks = jnp.kron(1 - jnp.eye(2, dtype=jnp.int32), jnp.ones((b, b), jnp.int32)).astype(bool)
    false_neg_mask = _on_all_blocks(false_negative)
    return {
        "false_negative_fraction": jnp.sum(false_negative) / max(b * (b - 1), 1),
        "pos_similarity": _masked_mean(logits, _on_all_blocks(same) & cross_blocks),
        "true_neg_similarity": _masked_mean(logits, _on_all_blocks(~same)),
        "false_neg_similarity": _masked_mean(logits, false_neg_mask),
        "false_neg_count": jnp.sum(false_neg_mask),
        "true_pos_similarity": jnp.mean(jnp.diagonal(logits, offset=b)),
    }
