"""The programs a run executes, built for a mesh whose devices need not be attached: each one the jitted function
the trainer or evaluator calls, lowered on abstract inputs (shapes and shardings, no data), with how often a run
calls it and what else stays in each device's memory while it runs.

Built with the run's own builders (`train.make_run`, `train.abstract_state`, `train.batch_spec`,
`kmeans.lower_kmeans`, `probes.knn_votes_program`, ...), so what is compiled here is what a run compiles.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from spcl_jax import evaluate, kmeans, probes, sharding, train
from spcl_jax.data import pipeline

if TYPE_CHECKING:
    from spcl_jax import startup
    from spcl_jax.data.sizes import Sizes

KNN_CHUNK = 1024  # query rows per kNN call (probes.knn_predict's chunk)


@dataclasses.dataclass
class Program:
    """One program of a run, lowered for the mesh.

    calls: how often a run calls it. resident: bytes per device that other buffers keep while it runs (the
    train state during clustering, the feature bank). counted_flops / counted_bytes: per call and device, where
    XLA's cost analysis cannot count (the iterations of k-means' loop are an argument), else None.
    """

    name: str
    what: str
    lowered: object
    calls: int
    resident: int = 0
    counted_flops: float | None = None
    counted_bytes: float | None = None


def tree_bytes(tree: Any) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _rows(mesh, shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh))


def _replicated(mesh, shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.replicated(mesh))


def build(parts: startup.Parts, sizes: Sizes, mesh: jax.sharding.Mesh,
          names: Collection[str] | None = None) -> dict[str, Program]:
    """{name: Program} of the run of `parts` (a `startup.Parts`) on `mesh` (all of PROGRAMS, or `names`)."""
    method, batch, n_epochs, c = parts.method, parts.training.batch_size, parts.training.n_epochs, parts.clustering
    splits = sizes.splits(parts.dataset)
    run = train.make_run(parts, splits, mesh)
    state = train.abstract_state(run)
    devices = mesh.devices.size
    dim = parts.architecture.features_dim
    bank_rows = -(-sizes.pretrain // batch) * batch  # the feature pass pads to whole batches
    state_bytes = tree_bytes(state)
    bank_bytes = bank_rows * dim * 4 // devices
    clusterings = len(range(0, n_epochs, c.reassign)) if method.clustering else 0
    builders = {
        "train_step": lambda: Program(
            "train_step", f"the pretraining step ({method.name}, {len(run.specs)} views, donated state)",
            run.train_step.lower(state, train.batch_spec(run, batch)),
            calls=run.steps_per_epoch * n_epochs),
        "feature_pass": lambda: Program(
            "feature_pass", f"frozen encoder over the pretrain set, {batch} images a call",
            run.encode.lower(state.params, state.batch_stats, _feature_batch(run, mesh, batch)),
            calls=clusterings * bank_rows // batch, resident=state_bytes + bank_bytes),
        "pca_statistics": lambda: Program(
            "pca_statistics", f"mean and covariance of the {bank_rows:,} x {dim} feature bank (PCA-whitening; the "
            "eigendecomposition runs on the host)",
            kmeans.lower_pca_whiten(_rows(mesh, (bank_rows, dim), jnp.float32), c.pca_dim)[0],
            calls=clusterings, resident=state_bytes),
        "pca_projection": lambda: Program(
            "pca_projection", f"the bank whitened to {min(c.pca_dim, dim)} dimensions",
            kmeans.lower_pca_whiten(_rows(mesh, (bank_rows, dim), jnp.float32), c.pca_dim)[1],
            calls=clusterings, resident=state_bytes),
        "kmeans": lambda: _kmeans(c, mesh, bank_rows, dim, clusterings, state_bytes + bank_bytes),
        "linear_eval_step": lambda: _linear_eval_step(parts, run, sizes, mesh, state, dim),
        "knn": lambda: _knn(parts.evaluation, sizes, mesh, dim),
    }
    wanted = [n for n in PROGRAMS if names is None or n in names]
    if not method.clustering:
        wanted = [n for n in wanted if n not in ("feature_pass", "pca_statistics", "pca_projection", "kmeans")]
    if not c.pca_dim:
        wanted = [n for n in wanted if not n.startswith("pca")]
    return {n: builders[n]() for n in wanted}


PROGRAMS = ("train_step", "feature_pass", "pca_statistics", "pca_projection", "kmeans", "linear_eval_step", "knn")


def _feature_batch(run, mesh, batch_size):
    spec = pipeline.batch_spec(("a",), 1, run.source.canvas_shape, batch_size)
    return {k: _rows(mesh, shape, dtype) for k, (shape, dtype) in spec.items()}


def _kmeans(c, mesh, rows, dim, clusterings, resident):
    """k-means over the whitened bank. Its Lloyd iterations are a loop XLA does not count, so its work is counted:
    per iteration and final assignment, the (rows x K x (d + 1)) distance product and one read of the bank."""
    d = min(c.pca_dim, dim) if c.pca_dim else dim
    devices = mesh.devices.size
    passes = c.kmeans_iters + 1
    return Program(
        "kmeans", f"{c.kmeans_iters} Lloyd iterations, K={c.num_prototypes}, on the {rows:,} x {d} bank",
        kmeans.lower_kmeans(_rows(mesh, (rows, d), jnp.float32), c.num_prototypes, init=c.kmeans_init),
        calls=clusterings, resident=resident,
        counted_flops=passes * 2.0 * rows * c.num_prototypes * (d + 1) / devices,
        counted_bytes=passes * 4.0 * rows * d / devices)


def _linear_eval_step(parts, run, sizes, mesh, state, dim):
    """A step of the linear head: on augmented train views through the frozen encoder (original protocol), or on
    cached features (fast)."""
    evaluation, devices = parts.evaluation, mesh.devices.size
    original = evaluation.protocol == "original"
    batch = min(evaluation.batch_size, sizes.train // devices * devices if original else sizes.train)
    steps = sizes.train // max(batch, 1)
    graphdef, params, tx = evaluate.linear_head(evaluation, steps, dim, sizes.num_classes, jax.random.key(0))  # small
    params = jax.tree.map(lambda x: _replicated(mesh, x.shape, x.dtype), params)
    opt_state = jax.tree.map(lambda x: _replicated(mesh, x.shape, x.dtype), jax.eval_shape(tx.init, params))
    if original:
        evaluator = evaluate.Evaluator(parts, run.splits, run.graphdef, mesh)
        step = evaluate.make_head_step(graphdef, tx, evaluator.augmented_embed)
        encoder = (state.params, state.batch_stats)
        inputs, what = _feature_batch(run, mesh, batch), "through the frozen encoder (linear_eval_protocol=original)"
    else:
        step = evaluate.make_head_step(graphdef, tx, evaluate.cached_features)
        encoder, inputs, what = None, _rows(mesh, (batch, dim), jnp.float32), "on cached features (fast)"
    return Program("linear_eval_step", f"the linear head, {batch} images a step, {what}",
                   step.lower(params, opt_state, encoder, inputs, _rows(mesh, (batch,), jnp.int32)),
                   calls=evaluation.epochs * steps if evaluation.epochs else 0)


def _knn(evaluation, sizes, mesh, dim):
    devices = mesh.devices.size
    rows = -(-sizes.train // devices) * devices
    program = probes.knn_votes_program(mesh, sizes.num_classes, min(evaluation.knn_k, sizes.train))
    queries = -(-sizes.test // KNN_CHUNK) + -(-sizes.valid // KNN_CHUNK)
    return Program("knn", f"weighted kNN (k={evaluation.knn_k}) against the {sizes.train:,} x {dim} train bank, "
                          f"{KNN_CHUNK} queries a call",
                   program.lower(_rows(mesh, (rows, dim), jnp.float32), _rows(mesh, (rows,), jnp.int32),
                                 _replicated(mesh, (KNN_CHUNK, dim), jnp.float32), _replicated(mesh, (), jnp.float32)),
                   calls=queries)
