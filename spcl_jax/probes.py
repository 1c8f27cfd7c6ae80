"""The pure parts of evaluation: top-1/top-k accuracies weighted as the original reports them, the sharded
weighted kNN, the evaluation's settings and the valid choices of their keys (checked by config_validation)."""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from spcl_jax.sharding import from_whole

PROTOCOLS = ("original", "fast")  # linear_eval_protocol
FINETUNE_OPTIMISERS = ("sgd", "lars")
METRIC_WEIGHTINGS = ("sample", "batch")  # batch: as written (B-17)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Linear and kNN evaluation: the protocol, the linear head's epochs, batch and optimiser (LARS with the
    pretraining's lars_mode, lars_eta and momentum), kNN's k and temperature, how accuracies are averaged and
    whether the random init is scored too. Config keys `linear_eval_protocol`, `finetune_<field>`, `knn_k`,
    `knn_temperature`, `eval_metric_weighting`, `eval_random_init_baseline`, `lars_mode`, `lars_eta`, `momentum`."""

    protocol: str
    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    optimiser: str
    lars_mode: str
    lars_eta: float
    momentum: float
    knn_k: int
    knn_temperature: float
    metric_weighting: str
    random_init_baseline: bool


def top_k(num_classes: int) -> int:
    return min(math.ceil(num_classes / 2), 5)


def weighted_mean(hits: np.ndarray, batch_size: int | None = None) -> float:
    """Mean of per-sample hits or, given `batch_size`, the unweighted mean of per-batch means as the
    original reports accuracies (B-17: a smaller last batch counts as much as a full one)."""
    hits = np.asarray(hits, np.float64)
    if batch_size is None:
        return float(np.mean(hits))
    return float(np.mean([hits[i:i + batch_size].mean() for i in range(0, len(hits), batch_size)]))


def accuracies(logits: np.ndarray, labels: np.ndarray, k: int, batch_size: int | None = None) -> tuple[float, float]:
    """(top-1, top-k) fractions, weighted as `weighted_mean`; ties rank the lower class first (argmax)."""
    ranked = np.argsort(-np.asarray(logits), axis=1, kind="stable")[:, :k]
    labels = np.asarray(labels)
    return (weighted_mean(ranked[:, 0] == labels, batch_size),
            weighted_mean((ranked == labels[:, None]).any(1), batch_size))


@functools.lru_cache(maxsize=None)
def knn_votes_program(mesh: jax.sharding.Mesh, num_classes: int, k: int) -> jax.stages.Wrapped:
    """jit((train_x, train_y, block, temperature) -> (b, C) votes): the weighted kNN of `knn_predict` with the
    training features sharded by rows over `mesh` (labels -1 on padding rows, which never vote).

    Each device ranks its own rows and the k best of every device are merged, so no device holds more than its
    share of the (N, D) bank or of the (b, N) similarities (ImageNet's 1.28M x 2048 bank is 10 GB). The merge
    keeps the k largest similarities, ties to the lower row as one top-k over all rows would, so on one device
    the votes are those of one top-k over the whole bank. Cached: every evaluation of a run reuses one program.
    """
    axis = mesh.axis_names[0]

    def local(train_x: jax.Array, train_y: jax.Array, block: jax.Array, temperature: jax.Array) -> jax.Array:
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


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, x: np.ndarray, num_classes: int, k: int, temperature: float,
                chunk: int = 1024, mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
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


def disentanglement_probe(train_x: np.ndarray, train_y: np.ndarray, sets: dict[str, tuple[np.ndarray, np.ndarray]],
                          rng: np.random.Generator, *, limit: int | None = None, runs: int = 10) -> dict[str, float]:
    """The original's `eval_disent` (DIFFERENCES.md, eval_disent) with aligned labels (B-19, D-6): StandardScaler + RBF
    SVC on a random contiguous half of the feature dimensions drawn from `rng`, 10 runs; mean accuracy per split (and
    the last). `limit`: the first examples only (the original's debug switch keeps 32)."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    dim = train_x.shape[1]
    scores = {name: [] for name in sets}
    for _ in range(runs):
        start = rng.integers(0, dim // 2)
        cols = slice(start, start + dim // 2)
        probe = make_pipeline(StandardScaler(), SVC(gamma="auto")).fit(train_x[:limit, cols], train_y[:limit])
        for name, (x, y) in sets.items():
            scores[name].append(probe.score(x[:limit, cols], y[:limit]))
    results = {f"disent/{name}_mean": float(np.mean(v)) for name, v in scores.items()}
    results.update({f"disent/{name}_last": v[-1] for name, v in scores.items()})
    return results
