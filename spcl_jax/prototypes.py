"""Prototype (cluster) bookkeeping on the host: member tables, siamese pair plans, diagnostics.

Fixes of the original's pair dataset (DIFFERENCES.md, pairs): the cluster -> members table is rebuilt from the
pseudo labels every epoch (B-2) with one argsort instead of an O(K·N) Python loop (B-22); each global
batch holds exactly B/2 same-prototype pairs (B-9; the original's i.i.d. fair coin is mode
"bernoulli"); empty clusters are never drawn. Kept as the original: prototypes are drawn uniformly
over clusters (not ∝ size) and members uniformly with replacement, so a positive pair may repeat an
image. A plan is a pure function of (labels, seed, epoch), so every host derives the same global
plan and takes its own columns with `spcl_jax.sharding.host_slice`.
"""
from typing import NamedTuple

import numpy as np
from sklearn import metrics

from spcl_jax import streams

PAIR_MODES = ("exact_half", "bernoulli")


class PairPlan(NamedTuple):
    """One epoch's pairs; each field is (num_steps, batch_size), row s = global batch of step s."""

    idx_a: np.ndarray  # int64 row index of the first image
    idx_b: np.ndarray  # int64 row index of the second image
    similarity: np.ndarray  # float32, 1 = same prototype, 0 = different prototypes



class NoPairsError(ValueError):
    """The pseudo labels allow no positive or no negative pair (e.g. every image in one cluster)."""

def member_table(pseudo_labels: np.ndarray, num_clusters: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cluster -> members table: members of cluster k are members_sorted[offsets[k]:offsets[k+1]].

    Returns (members_sorted (M,) int64, offsets (K+1,) int64, counts (K,) int64). Row indices are
    ascending within a cluster. Labels < 0 mean "no cluster" (k-means gives -1 to padded rows) and
    are left out, so M is the number of labelled rows.
    """
    labels = np.asarray(pseudo_labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"pseudo_labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if labels.size and labels.max() >= num_clusters:
        raise ValueError(f"pseudo label {labels.max()} is out of range for num_clusters={num_clusters}")
    rows = np.flatnonzero(labels >= 0)
    members = rows[np.argsort(labels[rows], kind="stable")].astype(np.int64)
    counts = np.bincount(labels[rows], minlength=num_clusters).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return members, offsets, counts


def pair_plan(pseudo_labels: np.ndarray, num_clusters: int, *, num_steps: int, batch_size: int, seed: int, epoch: int,
              mode: str = "exact_half") -> PairPlan:
    """An epoch's siamese pairs as a `PairPlan` of (num_steps, batch_size) arrays.

    similarity 1 = both rows in one prototype (drawn among clusters with >= 2 members), 0 = rows of
    two distinct non-empty prototypes. "exact_half": each step has exactly B/2 of each, at shuffled
    positions; "bernoulli": each pair's kind is a fair coin (the original). Deterministic for
    (seed, epoch).
    """
    if mode not in PAIR_MODES:
        raise ValueError(f"mode must be one of {PAIR_MODES}, got {mode!r}")
    if mode == "exact_half" and batch_size % 2:
        raise ValueError(f"batch_size must be even for exact_half pairs, got {batch_size}")
    if num_steps < 0 or batch_size < 1:
        raise ValueError(f"need num_steps >= 0 and batch_size >= 1, got {num_steps}, {batch_size}")
    members, offsets, counts = member_table(pseudo_labels, num_clusters)
    positive_clusters = np.flatnonzero(counts >= 2)
    nonempty_clusters = np.flatnonzero(counts >= 1)
    if positive_clusters.size == 0 or nonempty_clusters.size < 2:
        raise NoPairsError(f"cannot build pairs: {positive_clusters.size} clusters have >= 2 members "
                         f"and {nonempty_clusters.size} are non-empty (need >= 1 and >= 2)")
    rng = streams.pair_plan(seed, epoch)
    shape = (num_steps, batch_size)
    if mode == "exact_half":
        half = np.repeat([True, False], batch_size // 2)
        is_pos = rng.permuted(np.broadcast_to(half, shape), axis=1)
    else:
        is_pos = rng.random(shape) < 0.5
    n_pos = int(is_pos.sum())
    n_neg = is_pos.size - n_pos

    def draw_member(clusters: np.ndarray) -> np.ndarray:
        return members[offsets[clusters] + rng.integers(0, counts[clusters])]

    pos_cluster = positive_clusters[rng.integers(0, positive_clusters.size, n_pos)]
    first = rng.integers(0, nonempty_clusters.size, n_neg)
    other = rng.integers(0, nonempty_clusters.size - 1, n_neg)
    other += other >= first  # uniform over the other non-empty clusters
    idx_a = np.empty(shape, np.int64)
    idx_b = np.empty(shape, np.int64)
    idx_a[is_pos], idx_b[is_pos] = draw_member(pos_cluster), draw_member(pos_cluster)
    idx_a[~is_pos] = draw_member(nonempty_clusters[first])
    idx_b[~is_pos] = draw_member(nonempty_clusters[other])
    return PairPlan(idx_a, idx_b, is_pos.astype(np.float32))


def clustering_stats(assignments: np.ndarray, num_clusters: int, inertia: float,
                     true_labels: np.ndarray | None = None) -> dict[str, float]:
    """Diagnostics of one clustering: inertia, empty clusters, cluster sizes, NMI/ARI vs labels.

    Rows with assignment < 0 (padding) are left out; `true_labels` is aligned with `assignments`.
    """
    assignments = np.asarray(assignments)
    kept = assignments >= 0
    sizes = np.bincount(assignments[kept], minlength=num_clusters)
    stats = {
        "inertia": float(inertia),
        "empty_clusters": int(np.sum(sizes == 0)),
        "size_min": int(sizes.min()),
        "size_median": float(np.median(sizes)),
        "size_max": int(sizes.max()),
    }
    if true_labels is not None:
        truth = np.asarray(true_labels)[kept]
        stats["nmi"] = float(metrics.normalized_mutual_info_score(truth, assignments[kept]))
        stats["ari"] = float(metrics.adjusted_rand_score(truth, assignments[kept]))
    return stats
