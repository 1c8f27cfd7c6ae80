"""Every random stream of a run, named in one place.

Each is a pure function of the run's seed (and the epoch where it changes every epoch), so hosts agree
without talking and a resumed run draws what an uninterrupted one would. Host streams are numpy
Generators or seed words for `spcl_jax.data.crops.counter_uniforms`; device streams are JAX keys.
Parameter initialisation uses the `rbg` generator: XLA compiles its random ops about 5x faster than
threefry's, which dominates start-up on CPU.
"""
import jax
import numpy as np

# Stream words: the second seed word of the streams that change every epoch.
_FEATURE_PASS = 1  # the clustering feature pass's views, and the k-means key
_CLASSIFIER = 2  # the prototype classifier's initialisation
_TRAIN_VIEWS = 3  # the training steps' views
_LINEAR_EVAL_VIEWS = 4  # the original linear protocol's training views
_EPOCH_ORDER = 1  # third word: the per-epoch image order of non-pair methods


def init_key(*seeds: int) -> jax.Array:
    """A parameter-initialisation key (rbg) from integers."""
    return jax.random.key(int(np.random.SeedSequence(list(seeds)).generate_state(1)[0]), impl="rbg")


def network_init(seed: int) -> jax.Array:
    return init_key(seed)


def classifier_init(seed: int, epoch: int) -> jax.Array:
    """The prototype classifier re-initialised at `epoch`."""
    return init_key(seed, _CLASSIFIER, epoch)


def kmeans_key(seed: int, epoch: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _FEATURE_PASS), epoch)


def feature_views(seed: int, epoch: int) -> tuple[int, int, int]:
    """Seed words of the feature pass's views (each image's drawn by its dataset index)."""
    return (seed, _FEATURE_PASS, epoch)


def train_views(seed: int, epoch: int) -> tuple[int, int, int]:
    """Seed words of an epoch's training views (each drawn by its position in the epoch's plan)."""
    return (seed, _TRAIN_VIEWS, epoch)


def linear_eval_views(seed: int, epoch: int) -> tuple[int, int, int]:
    """Seed words of the original linear protocol's views in finetune epoch `epoch`."""
    return (seed, _LINEAR_EVAL_VIEWS, epoch)


def pair_plan(seed: int, epoch: int) -> np.random.Generator:
    """The Generator of an epoch's pair plan."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch]))


def epoch_order(seed: int, epoch: int) -> np.random.Generator:
    """The Generator of an epoch's image order (methods without pairs)."""
    return np.random.default_rng([seed, epoch, _EPOCH_ORDER])


def sampler_order(seed: int, epoch: int) -> np.random.Generator:
    """The Generator of the as-written feature pass's sampler order (B-3)."""
    return np.random.default_rng([seed, epoch])


def linear_head_orders(seed: int) -> np.random.Generator:
    """The Generator of the linear head's per-epoch permutations of the training set."""
    return np.random.default_rng(seed)


def linear_head_init(seed: int) -> jax.Array:
    return jax.random.key(seed)


def disentanglement_probe(seed: int) -> np.random.Generator:
    """The Generator of the `eval_disent` probe's feature halves."""
    return np.random.default_rng(seed)


def figure_subset(seed: int) -> np.random.Generator:
    """The Generator of the examples shown in the cluster figure."""
    return np.random.default_rng(seed)
