"""Member table, siamese pair plans and clustering diagnostics (DIFFERENCES.md: pairs, B-2, B-9, B-22)."""
from collections import defaultdict

import numpy as np
import pytest
from scipy import stats

from spcl_jax import prototypes
from spcl_jax.data import pipeline


def _labels(num_clusters=12, seed=0):
    """Pseudo labels with very unequal cluster sizes, singletons and empty clusters."""
    rng = np.random.default_rng(seed)
    sizes = np.array([40, 3, 1, 0, 25, 2, 0, 60, 1, 9, 5, 17])[:num_clusters]
    labels = np.repeat(np.arange(num_clusters), sizes)
    return rng.permutation(labels)


def test_member_table_matches_naive_buckets():
    labels = _labels()
    labels[[0, 5]] = -1  # padded rows belong to no cluster
    members, offsets, counts = prototypes.member_table(labels, 12)
    naive = defaultdict(list)
    for row, label in enumerate(labels):
        if label >= 0:
            naive[label].append(row)
    for k in range(12):
        assert members[offsets[k]:offsets[k + 1]].tolist() == naive.get(k, [])
        assert counts[k] == len(naive.get(k, []))
    assert offsets[-1] == members.size == np.sum(labels >= 0)


def test_member_table_rejects_out_of_range_label():
    with pytest.raises(ValueError, match="out of range"):
        prototypes.member_table(np.array([0, 3]), 3)


@pytest.mark.parametrize("mode", ["exact_half", "bernoulli"])
def test_pairs_follow_the_pseudo_labels(mode):
    labels = _labels()
    plan = prototypes.pair_plan(labels, 12, num_steps=50, batch_size=16, seed=3, epoch=1, mode=mode)
    assert plan.idx_a.shape == plan.idx_b.shape == plan.similarity.shape == (50, 16)
    assert plan.idx_a.dtype == plan.idx_b.dtype == np.int64
    assert plan.similarity.dtype == np.float32
    same = labels[plan.idx_a] == labels[plan.idx_b]
    np.testing.assert_array_equal(same, plan.similarity == 1)
    per_step = plan.similarity.sum(axis=1)
    if mode == "exact_half":
        assert np.all(per_step == 8)
        assert len({tuple(row) for row in plan.similarity}) > 1  # positions are shuffled
    else:
        assert not np.all(per_step == 8)
        assert abs(plan.similarity.mean() - 0.5) < 0.05


def test_prototypes_are_uniform_over_eligible_clusters():
    labels = _labels()
    counts = np.bincount(labels, minlength=12)
    plan = prototypes.pair_plan(labels, 12, num_steps=500, batch_size=32, seed=0, epoch=0)
    pos = plan.similarity == 1
    pos_clusters = labels[plan.idx_a[pos]]
    assert set(pos_clusters) == set(np.flatnonzero(counts >= 2))
    observed = np.bincount(pos_clusters, minlength=12)[counts >= 2]
    assert stats.chisquare(observed).pvalue > 1e-3
    for side in (plan.idx_a, plan.idx_b):
        neg_clusters = labels[side[~pos]]
        assert set(neg_clusters) == set(np.flatnonzero(counts >= 1))
        observed = np.bincount(neg_clusters, minlength=12)[counts >= 1]
        assert stats.chisquare(observed).pvalue > 1e-3


def test_members_are_uniform_within_a_cluster():
    labels = _labels()
    plan = prototypes.pair_plan(labels, 12, num_steps=400, batch_size=32, seed=1, epoch=0)
    big = np.flatnonzero(labels == 7)  # 60 members
    drawn = np.concatenate([plan.idx_a[labels[plan.idx_a] == 7], plan.idx_b[labels[plan.idx_b] == 7]])
    observed = np.array([np.sum(drawn == row) for row in big])
    assert stats.chisquare(observed).pvalue > 1e-3


def test_plan_is_deterministic_per_seed_and_epoch():
    labels = _labels()
    make = lambda seed, epoch: prototypes.pair_plan(labels, 12, num_steps=4, batch_size=8,
                                                    seed=seed, epoch=epoch)
    first, again = make(7, 2), make(7, 2)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first.idx_a, make(7, 3).idx_a)
    assert not np.array_equal(first.idx_a, make(8, 2).idx_a)


def test_empty_clusters_never_break_the_plan():
    labels = np.array([5, 5, 9, 9, 9, 2])  # 7 of 10 clusters empty, one singleton
    plan = prototypes.pair_plan(labels, 10, num_steps=20, batch_size=4, seed=0, epoch=0)
    assert set(labels[plan.idx_a].ravel()) | set(labels[plan.idx_b].ravel()) == {2, 5, 9}
    np.testing.assert_array_equal(labels[plan.idx_a] == labels[plan.idx_b], plan.similarity == 1)


@pytest.mark.parametrize("labels, match", [
    (np.array([0, 1, 2, 3]), "clusters have >= 2 members"),  # all singletons
    (np.array([4, 4, 4]), "non-empty"),  # a single cluster
])
def test_degenerate_labels_raise(labels, match):
    with pytest.raises(ValueError, match=match):
        prototypes.pair_plan(labels, 5, num_steps=1, batch_size=2, seed=0, epoch=0)


def test_odd_batch_size_is_refused_for_exact_half():
    with pytest.raises(ValueError, match="got 7"):
        prototypes.pair_plan(_labels(), 12, num_steps=1, batch_size=7, seed=0, epoch=0)


def test_host_slices_are_disjoint_and_cover_the_global_plan():
    plan = prototypes.pair_plan(_labels(), 12, num_steps=6, batch_size=16, seed=0, epoch=0)
    for array in plan:
        parts = [pipeline.host_share(array, p, 4, axis=1) for p in range(4)]
        assert all(part.shape == (6, 4) for part in parts)
        np.testing.assert_array_equal(np.concatenate(parts, axis=1), array)
    with pytest.raises(ValueError, match="not divisible"):
        pipeline.host_share(plan.idx_a, 0, 3, axis=1)


def test_clustering_stats():
    assignments = np.array([0, 0, 1, 1, 1, -1, 3])
    truth = np.array([1, 1, 0, 0, 0, 2, 2])
    out = prototypes.clustering_stats(assignments, 4, 12.5, truth)
    assert out["inertia"] == 12.5
    assert (out["empty_clusters"], out["size_min"], out["size_max"]) == (1, 0, 3)
    assert out["size_median"] == 1.5
    assert out["nmi"] == pytest.approx(1.0) and out["ari"] == pytest.approx(1.0)
    assert "nmi" not in prototypes.clustering_stats(assignments, 4, 0.0)
