"""The feature pass: the frozen encoder over a whole split, every example exactly once (DIFFERENCES.md, feature pass and B-3).

Examples are visited in the given order (dataset order by default) in global batches padded to a
fixed size, loaded ahead by the input pipeline like training batches; the padded rows are masked.
The (N, D) result stays on the devices, sharded by rows: each batch's output is written into a
donated (batches, B, D) buffer sharded along B, which is then viewed as rows without moving data,
so the row order is a known permutation of the visiting order.
"""
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from spcl_jax import augment, sharding
from spcl_jax.data import pipeline

FEATURE_VIEWS = {"augmented": "pretrain", "eval": "eval"}  # cluster_feature_view -> the view's recipe
FEATURE_PASS_ORDERS = ("dataset", "sampler")  # feature_pass_order; sampler: as written (B-3)


@functools.partial(jax.jit, donate_argnums=0)
def _write(buffer, batch_features, index):
    return jax.lax.dynamic_update_index_in_dim(buffer, batch_features, index, 0)


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "mesh"))
def _zeros_buffer(shape, dtype, mesh):
    """The (batches, B, D) output buffer, sharded along B. Module-level so that every epoch's pass reuses one
    compiled function (a jit of a fresh lambda compiled anew each time: 0.1 s per pass on a CPU)."""
    return jax.lax.with_sharding_constraint(jnp.zeros(shape, dtype), NamedSharding(mesh, P(None, "data")))


@functools.partial(jax.jit, static_argnames=("mesh",))
def _buffer_as_rows(buffer, mesh):
    """(batches, B, D) sharded along B -> (R, D) rows sharded P('data'), without moving data."""
    num_batches, batch_size, dim = buffer.shape
    num_devices = mesh.devices.size
    rows = buffer.reshape(num_batches, num_devices, batch_size // num_devices, dim).transpose(1, 0, 2, 3)
    return jax.lax.with_sharding_constraint(rows.reshape(-1, dim), NamedSharding(mesh, P("data")))


def _rows_of_buffer(num_batches, batch_size, num_devices):
    """Visiting position of each row of the row-sharded view of the (batches, B, D) buffer."""
    per_device = batch_size // num_devices
    grid = np.arange(num_batches * batch_size).reshape(num_batches, num_devices, per_device)
    return grid.transpose(1, 0, 2).reshape(-1)


def feature_pass(source: Any, order: np.ndarray, batch_size: int, kind: str, recipe: pipeline.Recipe,
                 seed: Sequence[int]) -> pipeline.BatchMaker:
    """This host's `BatchMaker` of one view (`kind`) of `source[order]` in global batches of `batch_size`,
    the last one padded with order[0]; each image's view is keyed by its index in `source`."""
    order = np.asarray(order)
    num_batches = -(-len(order) // batch_size)
    padded = np.concatenate([order, np.full(num_batches * batch_size - len(order), order[0])])
    return pipeline.make_pass(source, {"a": padded.reshape(num_batches, batch_size)}, (("a", kind),), recipe, seed,
                              jax.process_index(), jax.process_count(), key_by="index")


def extract_features(encode: Callable[[dict[str, jax.Array]], jax.Array], maker: pipeline.BatchMaker,
                     mesh: jax.sharding.Mesh, num_workers: int = 0) -> tuple[jax.Array, np.ndarray]:
    """Runs `encode(batch) -> (b, D)` over every step of the feature pass `maker`.

    Returns (features (R, D) sharded P('data'), position (R,) int64 numpy): row r holds the encoding
    of the pass's example `position[r]` (visiting order; padding when >= the number of examples).
    """
    num_devices = mesh.devices.size
    num_batches = maker.num_steps
    batch_size = maker.global_batch
    batch_sh = sharding.batch_sharding(mesh)
    buffer = None
    with pipeline.Loader(maker, num_workers=num_workers) as loader:
        for b, host_batch in enumerate(loader):
            out = encode(sharding.to_global(host_batch, batch_sh))
            if buffer is None:
                buffer = _zeros_buffer((num_batches,) + out.shape, out.dtype, mesh)
            buffer = _write(buffer, out, b)
    return _buffer_as_rows(buffer, mesh), _rows_of_buffer(num_batches, batch_size, num_devices)


def make_encode(graphdef: nnx.GraphDef, aug: augment.AugmentParams, mesh: jax.sharding.Mesh,
                kind: str = "eval") -> jax.stages.Wrapped:
    """Jitted frozen-encoder features (BatchNorm in eval mode) of one view of a host batch: the clean eval
    view or, as the original's SPCL clusters (DIFFERENCES.md, B-8: the default), a pretraining view: (params, batch_stats, batch) -> (b, D)."""

    def encode(params: Any, batch_stats: Any, batch: dict[str, jax.Array]) -> jax.Array:
        net = nnx.merge(graphdef, params, batch_stats, copy=True)
        net.encoder.eval()
        return net.encoder(augment.views(batch, (("a", kind),), aug)[0])

    replicated = sharding.replicated(mesh)
    return jax.jit(encode, in_shardings=(replicated, replicated, sharding.batch_sharding(mesh)),
                   out_shardings=sharding.batch_sharding(mesh))


def features_in_order(encode: Callable[[dict[str, jax.Array]], jax.Array], source: Any, batch_size: int,
                      mesh: jax.sharding.Mesh, recipe: pipeline.Recipe, num_workers: int = 0) -> np.ndarray:
    """(N, D) numpy features of the eval view of `source` in dataset order on every host (evaluation sets)."""
    maker = feature_pass(source, np.arange(len(source)), batch_size, "eval", recipe, seed=(0,))
    feats, position = extract_features(encode, maker, mesh, num_workers)
    valid = position < len(source)
    out = np.empty((len(source), feats.shape[1]), np.float32)
    out[position[valid]] = sharding.to_host(feats)[valid]
    return out
