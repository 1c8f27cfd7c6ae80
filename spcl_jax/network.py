"""The trained network of every method: encoder + projection head (+ metric learner, + supervised head)."""
from flax import nnx

from spcl_jax import checkpoint, models, streams

ENCODER_BN_MODES = ("train", "frozen_init_stats")  # encoder_bn_mode; frozen_init_stats: as written (B-4)


class Network(nnx.Module):
    """What the pretraining optimiser updates; the per-epoch prototype classifier lives apart (DIFFERENCES.md, prototype classifier)."""

    def __init__(self, config, method, num_classes, *, rngs):
        """`method` is a `spcl_jax.method.Method`: pair methods own a metric learner, supervised a linear head."""
        self.encoder = models.build_encoder(config, rngs=rngs)
        dim = self.encoder.features_dim
        dtype = models.DTYPES[config.dtype]
        self.projection = models.ProjectionHead(dim, config.proj_dim, dtype=dtype, rngs=rngs)
        self.metric_learner = models.MetricLearner(dim, rngs=rngs) if method.pairs else None
        self.supervised_head = models.LinearHead(dim, num_classes, rngs=rngs) if method.supervised else None


PROTOTYPE_CLASSIFIER_WIDTHS = ("num_prototypes", "n_classes")


def prototype_classifier_width(config, num_classes):
    """K outputs (fixes DIFFERENCES.md B-1); `n_classes` reproduces the original's width."""
    return config.num_prototypes if config.prototype_classifier_width == "num_prototypes" else num_classes


def create(config, method, num_classes, seed):
    """(graphdef, params, batch_stats) of a freshly initialised Network, built in one compiled call
    (eager initialisation would compile every initializer of every layer separately)."""
    net = nnx.jit(lambda: Network(config, method, num_classes, rngs=nnx.Rngs(streams.network_init(seed))))()
    return nnx.split(net, nnx.Param, nnx.BatchStat)


def abstract(config, method, num_classes):
    """(graphdef, params, batch_stats) of the Network as shapes only (`jax.ShapeDtypeStruct` leaves), computing
    nothing: what compiling for hardware elsewhere, and the state's shardings, need."""
    net = nnx.eval_shape(lambda: Network(config, method, num_classes, rngs=nnx.Rngs(0)))
    return nnx.split(net, nnx.Param, nnx.BatchStat)


def restore(config, method, num_classes, directory, step):
    """(graphdef, params, batch_stats, step) of the Network of `config` holding the values saved at step
    `step` (-1 = newest) in the checkpoint `directory`; a checkpoint of another shape is one CheckpointError."""
    graphdef, params, batch_stats = create(config, method, num_classes, config.seed)
    saved, step = checkpoint.restore_network(directory, step)
    what = f"checkpoint step {step} in {directory}"
    return (graphdef, checkpoint.fill(params, saved["params"], what=what),
            checkpoint.fill(batch_stats, saved["batch_stats"], what=what), step)
