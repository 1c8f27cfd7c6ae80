"""The batches of one pretraining epoch: the global index plan (pairs drawn from the pseudo labels' buckets for
spcl/metric, a permutation for the other methods), this host's pass over its columns of it, and each step's global
batch sharded by rows.
"""
from typing import Any

import jax
import numpy as np

from spcl_jax import data, prototypes, sharding, streams
from spcl_jax.data import pipeline
from spcl_jax.errors import SAME_COMMAND, DivergedError


def epoch_plan(run: Any, epoch: int, pseudo: np.ndarray | None) -> dict[str, np.ndarray]:  # train.Run
    """Global index batches of one epoch: {images_a, [images_b, similarity]} index arrays (steps, B)."""
    parts, c, source = run.parts, run.parts.clustering, run.source
    steps, batch = run.steps_per_epoch, parts.training.batch_size
    if run.method.pairs:
        # As written (B-2) the pairs come from the ground-truth class buckets while the cluster is drawn
        # from [0, K): only classes below K are used (the original fails on the others when K > classes).
        buckets = pseudo if c.rebuild_member_table else np.where(source.labels < c.num_prototypes, source.labels, -1)
        try:
            idx_a, idx_b, similarity = prototypes.pair_plan(
                buckets, c.num_prototypes, num_steps=steps, batch_size=batch, seed=parts.seed, epoch=epoch,
                mode=c.pair_sampling)
        except prototypes.NoPairsError as e:
            raise DivergedError(f"epoch {epoch + 1} has no pairs to train on ({e}): the features collapsed into too "
                                "few prototypes; lower learning_rate or set grad_clip_norm, then resume from an "
                                f"earlier checkpoint with {SAME_COMMAND} and that change") from e
        return {"a": idx_a, "b": idx_b, "similarity": similarity}
    order = data.epoch_order(source.labels, streams.epoch_order(parts.seed, epoch), parts.training.pretrain_sampling)
    order = order[:steps * batch]
    return {"a": order.reshape(steps, batch)}


def epoch_pass(run: Any, epoch: int, plan: dict[str, np.ndarray]) -> pipeline.BatchMaker:  # train.Run
    """This host's `BatchMaker` of an epoch's training steps (its columns of the global plan)."""
    sets = {name: plan[name] for name in ("a", "b") if name in plan}
    return pipeline.make_pass(run.source, sets, run.specs, run.parts.recipe,
                              streams.train_views(run.parts.seed, epoch), jax.process_index(), jax.process_count())


def make_batch(run: Any, plan: dict[str, np.ndarray], maker: pipeline.BatchMaker, step_in_epoch: int,  # train.Run
               host_batch: dict[str, np.ndarray], pseudo: np.ndarray | None) -> dict[str, jax.Array]:
    """Global arrays sharded by rows from this host's loaded batch and the labels of one step."""
    labels = pseudo if run.method.clustering else run.source.labels
    batch = dict(host_batch)
    for name, indices in maker.sets.items():
        batch[f"labels_{name}"] = labels[indices[step_in_epoch]].astype(np.int32)
    if "similarity" in plan:
        similarity = sharding.host_slice(plan["similarity"], axis=1)
        batch["similarity"] = similarity[step_in_epoch].astype(np.float32)
    return sharding.to_global(batch, sharding.batch_sharding(run.mesh))


def load_batch(run: Any, epoch: int, plan: dict[str, np.ndarray], step_in_epoch: int,  # train.Run
               pseudo: np.ndarray | None) -> dict[str, jax.Array]:
    """One step's batch, loaded synchronously (tests and tools; the trainer loads ahead)."""
    maker = epoch_pass(run, epoch, plan)
    return make_batch(run, plan, maker, step_in_epoch, maker(step_in_epoch), pseudo)
