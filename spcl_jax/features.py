"""The feature pass: the frozen encoder over a whole split, every example exactly once (spec §1.3, B-3).

Examples are visited in the given order (dataset order by default) in global batches padded to a
fixed size; the padded rows are masked. The (N, D) result stays on the devices, sharded by rows: each
batch's output is written into a donated (batches, B, D) buffer sharded along B, which is then viewed
as rows without moving data, so the row order is a known permutation of the visiting order.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from spcl_jax import augment, sharding


@functools.partial(jax.jit, donate_argnums=0)
def _write(buffer, batch_features, index):
    return jax.lax.dynamic_update_index_in_dim(buffer, batch_features, index, 0)


def _rows_of_buffer(num_batches, batch_size, num_devices):
    """Visiting position of each row of the row-sharded view of the (batches, B, D) buffer."""
    per_device = batch_size // num_devices
    grid = np.arange(num_batches * batch_size).reshape(num_batches, num_devices, per_device)
    return grid.transpose(1, 0, 2).reshape(-1)


def extract_features(encode, source, order, batch_size, mesh):
    """Runs `encode(images_uint8) -> (b, D)` over `source` in `order`.

    Returns (features (R, D) sharded P('data'), position (R,) int64 numpy): row r holds the encoding
    of example `order[position[r]]` when `position[r] < len(order)` (padding otherwise).
    """
    order = np.asarray(order)
    num_devices = mesh.devices.size
    num_batches = -(-len(order) // batch_size)
    padded = np.concatenate([order, np.full(num_batches * batch_size - len(order), order[0])])
    batch_sh = sharding.batch_sharding(mesh)
    buffer = None
    for b in range(num_batches):
        rows = padded[b * batch_size:(b + 1) * batch_size]
        images = sharding.to_global(source.get(sharding.host_slice(rows)), batch_sh)
        out = encode(images)
        if buffer is None:
            buffer = jax.jit(lambda: jnp.zeros((num_batches,) + out.shape, out.dtype),
                             out_shardings=NamedSharding(mesh, P(None, "data")))()
        buffer = _write(buffer, out, b)
    dim = buffer.shape[-1]
    per_device = batch_size // num_devices
    features = jax.jit(
        lambda x: x.reshape(num_batches, num_devices, per_device, dim).transpose(1, 0, 2, 3).reshape(-1, dim),
        out_shardings=NamedSharding(mesh, P("data")))(buffer)
    return features, _rows_of_buffer(num_batches, batch_size, num_devices)


def make_encode(graphdef, aug, mesh, view="eval"):
    """Jitted frozen-encoder features (BatchNorm in eval mode) of the clean eval view or, as written
    for SPCL's clustering (B-8), of an augmented view: (params, batch_stats, images, key) -> (b, D)."""

    def encode(params, batch_stats, images, key):
        net = nnx.merge(graphdef, params, batch_stats, copy=True)
        net.encoder.eval()
        x = augment.pretrain_view(key, images, aug) if view == "augmented" else augment.eval_view(images, aug)
        return net.encoder(x)

    replicated = sharding.replicated(mesh)
    return jax.jit(encode, in_shardings=(replicated, replicated, sharding.batch_sharding(mesh), replicated),
                   out_shardings=sharding.batch_sharding(mesh))


def features_in_order(encode, source, batch_size, mesh):
    """(N, D) numpy features of `source` in dataset order on every host (evaluation sets)."""
    feats, position = extract_features(encode, source, np.arange(len(source)), batch_size, mesh)
    valid = position < len(source)
    out = np.empty((len(source), feats.shape[1]), np.float32)
    out[position[valid]] = sharding.to_host(feats)[valid]
    return out
