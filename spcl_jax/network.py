"""The trained network of every method: encoder + projection head (+ metric learner, + supervised head)."""
from typing import Any

from flax import nnx

from spcl_jax import checkpoint, models, streams
from spcl_jax.method import Method
from spcl_jax.models import Architecture

ENCODER_BN_MODES = ("train", "frozen_init_stats")  # encoder_bn_mode; frozen_init_stats: as written (B-4)
PROTOTYPE_CLASSIFIER_WIDTHS = ("num_prototypes", "n_classes")


class Network(nnx.Module):
    """What the pretraining optimiser updates; the per-epoch prototype classifier lives apart (DIFFERENCES.md, prototype classifier)."""

    def __init__(self, architecture: Architecture, method: Method, num_classes: int, *, rngs: nnx.Rngs):
        """Pair methods own a metric learner, supervised a linear head."""
        self.encoder = models.build_encoder(architecture, rngs=rngs)
        dim = self.encoder.features_dim
        dtype = models.DTYPES[architecture.dtype]
        self.projection = models.ProjectionHead(dim, architecture.proj_dim, dtype=dtype, rngs=rngs)
        self.metric_learner = models.MetricLearner(dim, rngs=rngs) if method.pairs else None
        self.supervised_head = models.LinearHead(dim, num_classes, rngs=rngs) if method.supervised else None


def prototype_classifier_width(choice: str, num_prototypes: int, num_classes: int) -> int:
    """K outputs (fixes DIFFERENCES.md B-1); `n_classes` reproduces the original's width."""
    return num_prototypes if choice == "num_prototypes" else num_classes


def create(architecture: Architecture, method: Method, num_classes: int, seed: int) -> tuple[nnx.GraphDef, Any, Any]:
    """(graphdef, params, batch_stats) of a freshly initialised Network, built in one compiled call
    (eager initialisation would compile every initializer of every layer separately)."""
    net = nnx.jit(lambda: Network(architecture, method, num_classes, rngs=nnx.Rngs(streams.network_init(seed))))()
    return nnx.split(net, nnx.Param, nnx.BatchStat)


def abstract(architecture: Architecture, method: Method, num_classes: int) -> tuple[nnx.GraphDef, Any, Any]:
    """(graphdef, params, batch_stats) of the Network as shapes only (`jax.ShapeDtypeStruct` leaves), computing
    nothing: what compiling for hardware elsewhere, and the state's shardings, need."""
    net = nnx.eval_shape(lambda: Network(architecture, method, num_classes, rngs=nnx.Rngs(0)))
    return nnx.split(net, nnx.Param, nnx.BatchStat)


def restore(architecture: Architecture, method: Method, num_classes: int, seed: int, directory: str,
            step: int) -> tuple[nnx.GraphDef, Any, Any, int]:
    """(graphdef, params, batch_stats, step) of the Network of `architecture` holding the values saved at step
    `step` (-1 = newest) in the checkpoint `directory`; a checkpoint of another shape is one CheckpointError."""
    graphdef, params, batch_stats = create(architecture, method, num_classes, seed)
    saved, step = checkpoint.restore_network(directory, step)
    what = f"checkpoint step {step} in {directory}"
    return (graphdef, checkpoint.fill(params, saved["params"], what=what),
            checkpoint.fill(batch_stats, saved["batch_stats"], what=what), step)
