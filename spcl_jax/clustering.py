"""Prototypes between epochs: the clustering of the whole training set (feature pass, PCA-whitening, k-means, pseudo
labels) and the fresh prototype classifier.

Everything takes the `train.Run` (its parts, method, splits, mesh and encode program) and the state; nothing here
steps the network.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import nnx

from spcl_jax import features, kmeans, models, progress, prototypes, sharding, storage, streams, visual

if TYPE_CHECKING:
    from spcl_jax.train_state import TrainState

VISUAL_POINTS = 5000  # examples in the `visual_cls` figure: a fixed random subset (datasets may be sorted by class)


@dataclasses.dataclass(frozen=True)
class Clustering:
    """The prototypes: K, the features clustered (view, visit order, PCA-whitening), k-means, how often, the
    prototype classifier's width (resolved: K, or the data's classes as written), how pairs are drawn from the
    prototypes and the `visual_cls` figure. Config keys of the same names, except `feature_view`
    (`cluster_feature_view`) and `classifier_width` (from `prototype_classifier_width`)."""

    num_prototypes: int
    classifier_width: int
    pca_dim: int
    pca_eigen_floor: float
    kmeans_iters: int
    kmeans_init: str
    reassign: int
    classifier_init_freq: int
    feature_view: str
    feature_pass_order: str
    rebuild_member_table: bool
    pair_sampling: str
    visual_cls: bool
    visual_freq: int


def classifier_module(dim: int, width: int, key: Any) -> models.PrototypeClassifier:
    """A prototype classifier, feature width `dim` -> `width` outputs, drawn with `key`."""
    return models.PrototypeClassifier(dim, width, rngs=nnx.Rngs(key))


def classifier_params(dim: int, width: int, key: Any) -> Any:
    """The parameters of a prototype classifier drawn with `key`."""
    return nnx.split(classifier_module(dim, width, key))[1]


def new_classifier(run: Any, key: Any) -> tuple[Any, Any]:  # train.Run
    """A fresh prototype classifier (N(0, 0.01²) kernel, zero bias) and a fresh SGD state (DIFFERENCES.md,
    prototype classifier)."""
    params = classifier_params(run.parts.architecture.features_dim, run.parts.clustering.classifier_width, key)
    return params, run.classifier_tx.init(params)


def cluster(run: Any, state: TrainState, epoch: int, key: jax.Array, *,  # train.Run
            projection: bool = False) -> tuple[np.ndarray, dict[str, float], np.ndarray | None]:
    """Feature pass -> PCA-whitening -> k-means; returns pseudo labels in dataset order, statistics and,
    if asked, the first two whitened components of every example (for the `visual_cls` figure)."""
    parts, c = run.parts, run.parts.clustering
    num = len(run.splits.pretrain)
    if c.feature_pass_order == "sampler":
        order = streams.sampler_order(parts.seed, epoch).integers(0, num, num)
    else:
        order = np.arange(num)
    maker = features.feature_pass(run.splits.pretrain, order, parts.training.batch_size,
                                  features.FEATURE_VIEWS[c.feature_view], parts.recipe,
                                  streams.feature_views(parts.seed, epoch))
    encode = lambda batch: run.encode(state.params, state.batch_stats, batch)  # noqa: E731
    feats, position = features.extract_features(encode, maker, run.mesh, parts.num_workers)
    valid = position < num
    # Each row's example index (-1 on padding): k-means draws by it, so any device count clusters alike.
    ids = np.where(valid, order[np.minimum(position, num - 1)], -1).astype(np.int32)
    valid_device, ids_device = (sharding.to_global(sharding.host_slice(v), sharding.batch_sharding(run.mesh))
                                for v in (valid, ids))
    whitened = kmeans.preprocess_features(feats, c.pca_dim, valid=valid_device, eigen_floor=c.pca_eigen_floor)
    x = whitened.features
    result = kmeans.kmeans(x, c.num_prototypes, c.kmeans_iters, key,
                           init=c.kmeans_init, valid=valid_device, ids=ids_device)
    # Label of visit position p goes to example p: with order = arange (the default) that is the
    # visited example; with the as-written sampler order (B-3) it is a different, random one.
    pseudo = np.empty(num, np.int64)
    pseudo[position[valid]] = sharding.to_host(result.assignments)[valid]
    labels = run.splits.pretrain.labels
    labelled = labels >= 0
    stats = prototypes.clustering_stats(pseudo, c.num_prototypes, float(result.inertia))
    stats["pca_floored"] = int(whitened.floored)
    if labelled.any():
        agreement = prototypes.clustering_stats(pseudo[labelled], c.num_prototypes, 0.0, labels[labelled])
        stats.update(nmi=agreement["nmi"], ari=agreement["ari"])
    points = None
    if projection:
        points = np.empty((num, 2), np.float32)
        points[position[valid]] = sharding.to_host(x[:, :2])[valid]
    return pseudo, stats, points


def recluster(loop: Any, state: TrainState, epoch: int) -> np.ndarray:  # train.Loop
    """`cluster`, announced and timed: its statistics to the metrics and, every `visual_freq` epochs with
    `visual_cls`, the figure of the first two whitened components (`figs/prototypes_epoch_<n>.png`)."""
    run, writer = loop.run, loop.writer
    seed, c = run.parts.seed, run.parts.clustering
    step = int(state.step)
    clustering = progress.Announcement(f"epoch {epoch + 1}: clustering {len(run.splits.pretrain):,} examples")
    draw = c.visual_cls and epoch % c.visual_freq == 0
    pseudo, stats, points = cluster(run, state, epoch, streams.kmeans_key(seed, epoch), projection=draw)
    stats = {f"kmeans/{k}": v for k, v in stats.items()}
    stats["kmeans/seconds"] = clustering.seconds
    loop.pace.clustered(stats["kmeans/seconds"])
    writer.write(step, epoch, stats)
    clustering.done(f"epoch {epoch + 1}: clustered", ": " + ", ".join(f"{k}={v:.4g}" for k, v in stats.items()))
    if draw and jax.process_index() == 0:
        shown = streams.figure_subset(seed).permutation(len(pseudo))[:VISUAL_POINTS]
        image = visual.cluster_figure(points[shown], pseudo[shown], run.splits.pretrain.labels[shown], epoch + 1)
        storage.makedirs(storage.join(loop.workdir, "figs"))
        visual.save_png(image, storage.join(loop.workdir, "figs", f"prototypes_epoch_{epoch + 1}.png"))
        writer.write_image(step, "prototypes/pca_by_pseudo_label", image)
    return pseudo
