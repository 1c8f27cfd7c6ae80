"""The pretraining objective of one batch: its views through the network (each view its own BatchNorm batch), then
`losses.spcl_objective` with the `Objective`'s weights for the terms the method keeps, or the supervised head's
cross-entropy.
"""
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from spcl_jax import augment, losses
from spcl_jax.method import Method


@dataclasses.dataclass(frozen=True)
class Objective:
    """The loss of a batch: NT-Xent temperature, the weights and kinds of its terms, the encoder's BatchNorm mode
    and whether the first view is left clean as written (B-7); config keys of the same names
    (`metric_loss_kind` is `metric_loss`)."""

    temperature: float
    contras_weight: float
    cluster_weight: float
    metric_weight: float
    cluster_loss: str
    metric_loss_kind: str
    encoder_bn_mode: str
    asymmetric_first_view: bool


def view_specs(method: Method, asymmetric_first_view: bool) -> tuple[tuple[str, str], ...]:
    """(image set, recipe) of each view: A1, A2, B1, B2 for pair methods, two views of one image for
    simclr/cluster, one for supervised. With `asymmetric_first_view` (B-7) the first view of every image
    is the clean eval view where the original's code leaves it so (simclr and metric)."""
    if method.supervised:
        return (("a", "train"),)
    first = "eval" if asymmetric_first_view and method.first_view_clean_as_written else "pretrain"
    return tuple(view for name in method.image_sets for view in ((name, first), (name, "pretrain")))


def encode_views(graphdef: nnx.GraphDef, params: Any, batch_stats: Any, views: jax.Array, *, project: bool,
                 frozen_bn: bool) -> tuple[nnx.State, tuple[list[jax.Array], list[jax.Array]]]:
    """Encoder (+ projection) on each view in turn, each its own BatchNorm batch, running statistics
    updated view after view exactly like the original's separate calls.

    Unrolled on purpose: a lax.scan over the views compiles no faster and its backward pass ran 8x
    slower on CPU.
    """
    net = nnx.merge(graphdef, params, batch_stats, copy=True)
    if frozen_bn:
        net.encoder.eval()
    h = [net.encoder(view) for view in views]
    z = [net.projection(x) for x in h] if project else h
    return nnx.state(net, nnx.BatchStat), (h, z)


def make_loss_fn(objective: Objective, method: Method, graphdef: nnx.GraphDef, classifier_graphdef: nnx.GraphDef | None,
                 aug: augment.AugmentParams, specs: tuple[tuple[str, str], ...]) -> Callable:
    """loss(params, classifier_params, batch_stats, batch) -> (total, (terms, batch_stats, diagnostics)):
    the views of the batch through the network, then `losses.spcl_objective` with the objective's weights for
    the terms of `method` (or, supervised, the cross-entropy of its linear head on the labels)."""

    def loss_fn(params: Any, classifier_params: Any, batch_stats: Any, batch: dict[str, jax.Array]
                ) -> tuple[jax.Array, tuple[dict[str, jax.Array], nnx.State, dict[str, jax.Array]]]:
        views = augment.views(batch, specs, aug)
        batch_stats, (h, z) = encode_views(graphdef, params, batch_stats, views, project=method.contrastive,
                                           frozen_bn=objective.encoder_bn_mode == "frozen_init_stats")
        net = nnx.merge(graphdef, params, batch_stats, copy=True)
        if method.supervised:
            loss = losses.prototype_loss(net.supervised_head(h[0]), batch["labels_a"])
            return loss, ({"supervised": loss}, batch_stats, {})
        logits = None
        if method.prototype_classifier:
            classifier = nnx.merge(classifier_graphdef, classifier_params)
            logits = [classifier(x) for x in h]
        pairs = {}
        if method.pairs:
            pairs = dict(z_vi=z[2], z_vj=z[3], h_i=h[0], h_j=h[1], v_i=h[2], v_j=h[3], labels_b=batch["labels_b"],
                         similarity=batch["similarity"], metric_fn=net.metric_learner.from_difference)
        total, terms = losses.spcl_objective(
            z[0], z[1], logits=logits, labels_a=batch["labels_a"], temperature=objective.temperature,
            contras_weight=objective.contras_weight, metric_weight=objective.metric_weight if method.pairs else 0.0,
            cluster_weight=objective.cluster_weight if method.prototype_classifier else 0.0,
            cluster_loss=objective.cluster_loss, metric_loss_kind=objective.metric_loss_kind, **pairs)
        diagnostics = losses.contrastive_diagnostics(z[0], z[1], batch["labels_a"], objective.temperature)
        return total, (terms, batch_stats, diagnostics)

    return loss_fn
