"""Heads on the encoder features (DIFFERENCES.md, model), initialised as the original: N(0, 0.01²) kernels, zero biases."""
import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from spcl_jax.models.batch_norm import BatchNorm

HEAD_INIT = jax.nn.initializers.normal(stddev=0.01)


def dense(in_features: int, out_features: int, *, dtype: DTypeLike = jnp.float32, rngs: nnx.Rngs) -> nnx.Linear:
    """Linear layer with the original's head init."""
    return nnx.Linear(in_features, out_features, kernel_init=HEAD_INIT, dtype=dtype, rngs=rngs)


class ProjectionHead(nnx.Module):
    """Linear D->D, BN, ReLU, Linear D->proj_dim, BN; no final ReLU (NT-Xent normalises). Returns float32."""

    def __init__(self, in_dim: int, proj_dim: int, *, dtype: DTypeLike = jnp.float32, rngs: nnx.Rngs):
        self.proj_fc1 = dense(in_dim, in_dim, dtype=dtype, rngs=rngs)
        self.proj_bn1 = BatchNorm(in_dim, dtype=dtype)
        self.proj_fc2 = dense(in_dim, proj_dim, dtype=dtype, rngs=rngs)
        self.proj_bn2 = BatchNorm(proj_dim, dtype=dtype)

    def __call__(self, h: jax.Array) -> jax.Array:
        z = nnx.relu(self.proj_bn1(self.proj_fc1(h)))
        return self.proj_bn2(self.proj_fc2(z)).astype(jnp.float32)


class LinearHead(nnx.Module):
    """Linear D->C classifier (the supervised / linear-evaluation head)."""

    def __init__(self, in_dim: int, num_classes: int, *, rngs: nnx.Rngs):
        self.fc = dense(in_dim, num_classes, rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        return self.fc(h)


class PrototypeClassifier(LinearHead):
    """Linear D->K over the k-means prototypes; re-initialise by constructing a new one with a fresh key."""

    def __init__(self, in_dim: int, num_prototypes: int, *, rngs: nnx.Rngs):
        super().__init__(in_dim, num_prototypes, rngs=rngs)


class MetricLearner(nnx.Module):
    """Siamese metric head: logit that two features come from the same prototype, Linear(|h_x - h_y|) -> (B,)."""

    def __init__(self, in_dim: int, *, rngs: nnx.Rngs):
        self.fc = dense(in_dim, 1, rngs=rngs)

    def from_difference(self, difference: jax.Array) -> jax.Array:
        """Logits (B,) from precomputed |h_x - h_y| (B, D): the `metric_fn` of `losses.siamese_metric_loss`."""
        return self.fc(difference)[:, 0]

    def __call__(self, h_x: jax.Array, h_y: jax.Array) -> jax.Array:
        return self.from_difference(jnp.abs(h_x - h_y))
