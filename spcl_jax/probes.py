"""The pure parts of evaluation: top-1/top-k accuracies weighted as the original reports them, the sharded
weighted kNN, and the valid choices of the evaluation keys (checked by config_validation)."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from spcl_jax.sharding import from_whole

PROTOCOLS = ("original", "fast")  # linear_eval_protocol
FINETUNE_OPTIMISERS = ("sgd", "lars")
METRIC_WEIGHTINGS = ("sample", "batch")  # batch: as written (B-17)


def top_k(num_classes):
    return min(math.ceil(num_classes / 2), 5)


def weighted_mean(hits, batch_size=None):
    """Mean of per-sample hits or, given `batch_size`, the unweighted mean of per-batch means as the
    original reports accuracies (B-17: a smaller last batch counts as much as a full one)."""
    hits = np.asarray(hits, np.float64)
    if batch_size is None:
        return float(np.mean(hits))
    return float(np.mean([hits[i:i + batch_size].mean() for i in range(0, len(hits), batch_size)]))


def accuracies(logits, labels, k, batch_size=None):
    """(top-1, top-k) fractions, weighted as `weighted_mean`; ties rank the lower class first (argmax)."""
    ranked = np.argsort(-np.asarray(logits), axis=1, kind="stable")[:, :k]
    labels = np.asarray(labels)
    return (weighted_mean(ranked[:, 0] == labels, batch_size),
            weighted_mean((ranked == labels[:, None]).any(1), batch_size))


@functools.lru_cache(maxsize=None)
def knn_votes_program(mesh, num_classes, k):
    """jit((train_x, train_y, block, temperature) -> (b, C) votes): the weighted kNN of `knn_predict` with the
    training features sharded by rows over `mesh` (labels -1 on padding rows, which never vote).

    Each device ranks its own rows and the k best of every device are merged, so no device holds more than its
    share of the (N, D) bank or of the (b, N) similarities (ImageNet's 1.28M x 2048 bank is 10 GB). The merge
    keeps the k largest similarities, ties to the lower row as one top-k over all rows would, so on one device
    the votes are those of one top-k over the whole bank. Cached: every evaluation of a run reuses one program.
    """
    axis = mesh.axis_names[0]

    def local(train_x, train_y, block, temperature):
        sims = jnp.where(train_y[None, :] >= 0, block @ train_x.T, -jnp.inf)
        top_sim, top_idx = jax.lax.top_k(sims, min(k, train_x.shape[0]))
        gather = functools.partial(jax.lax.all_gather, axis_name=axis, axis=1, tiled=True, to="invarying")
        candidates, labels = gather(top_sim), gather(train_y[top_idx])
        best, chosen = jax.lax.top_k(candidates, k)
        votes = jax.nn.one_hot(jnp.take_along_axis(labels, chosen, axis=1), num_classes)
        return (votes * jnp.exp(best / temperature)[..., None]).sum(1)

    rows = jax.sharding.PartitionSpec(axis)
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, jax.sharding.PartitionSpec(),
                                                             jax.sharding.PartitionSpec()),
                                 out_specs=jax.sharding.PartitionSpec()))


def knn_predict(train_x, train_y, x, num_classes, k, temperature, chunk=1024, mesh=None):
    """Weighted kNN votes (cosine similarity, weights exp(sim/T)) -> (n, C) scores, the training features sharded
    over `mesh` (default: one device)."""
    mesh = mesh or jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    train_x = train_x / np.maximum(np.linalg.norm(train_x, axis=1, keepdims=True), 1e-12)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    k = min(k, len(train_x))
    padding = -len(train_x) % mesh.devices.size
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names[0]))
    train_x = from_whole(np.pad(train_x.astype(np.float32), ((0, padding), (0, 0))), rows)
    train_y = from_whole(np.pad(np.asarray(train_y, np.int32), (0, padding), constant_values=-1), rows)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    votes = knn_votes_program(mesh, num_classes, k)
    return np.concatenate([np.asarray(votes(train_x, train_y, from_whole(x[i:i + chunk].astype(np.float32), replicated),
                                            np.float32(temperature)))
                           for i in range(0, len(x), chunk)])
