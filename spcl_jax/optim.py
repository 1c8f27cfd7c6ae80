"""Optimisers and learning-rate schedules of the original (DIFFERENCES.md, learning-rate schedule and LARS), built on optax.

LARS comes in two flavours (DIFFERENCES.md, B-5): `simclr` (the default) excludes biases and every normalisation
parameter from weight decay and from the trust ratio, and falls back to ratio 1 when a norm is 0;
`as_written` reproduces the original: weight decay chosen by the case-sensitive torch name filter,
and a trust ratio eta*|w|/|g| on every tensor, so zero-initialised biases never move.
"""
import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from spcl_jax.models.param_groups import key_name, is_norm_or_bias

_TORCH_BLOCK_BN = re.compile(r"^bn\d+$")


def _names(path):
    names = [key_name(k) for k in path]
    return names[:-1] if names and names[-1] == "value" else names


def decayed_as_written(path: jax.tree_util.KeyPath) -> bool:
    """The original's filter: decay unless the torch name contains 'bn' or 'bias' (case-sensitive).

    Only the residual blocks' `bn1/bn2/bn3` carry a lowercase 'bn' in torch; the stem, downsample and
    projection BatchNorm scales (`BN1`, `downsample.1`) are decayed.
    """
    names = _names(path)
    return not (names[-1] == "bias" or any(isinstance(n, str) and _TORCH_BLOCK_BN.match(n) for n in names))


def path_mask(params: Any, predicate: Callable[[jax.tree_util.KeyPath], bool]) -> Any:
    return jax.tree_util.tree_map_with_path(lambda path, _: bool(predicate(path)), params)


def scale_by_trust_ratio_as_written(trust_coefficient: float) -> optax.GradientTransformation:
    """eta*|w|/|g| for every tensor with no zero guard (|w|=0 -> 0, |g|=0 -> nan), as the original."""

    def update_fn(updates: Any, state: optax.EmptyState, params: Any) -> tuple[Any, optax.EmptyState]:
        def scale(u: jax.Array, p: jax.Array) -> jax.Array:
            ratio = trust_coefficient * jnp.linalg.norm(p) / jnp.linalg.norm(u)
            return u * ratio

        return jax.tree.map(scale, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def lars(learning_rate: float | optax.Schedule, *, weight_decay: float, trust_coefficient: float, momentum: float,
         mode: str, params: Any) -> optax.GradientTransformation:
    """LARS with Nesterov momentum and the lr inside the momentum buffer (torch's classic momentum)."""
    if mode == "simclr":
        mask = path_mask(params, lambda p: not is_norm_or_bias(p))
        return optax.lars(learning_rate, weight_decay=weight_decay, weight_decay_mask=mask,
                          trust_coefficient=trust_coefficient, eps=0.0, trust_ratio_mask=mask,
                          momentum=momentum, nesterov=True)
    return optax.chain(
        optax.masked(optax.add_decayed_weights(weight_decay), path_mask(params, decayed_as_written)),
        scale_by_trust_ratio_as_written(trust_coefficient),
        optax.scale_by_learning_rate(learning_rate),
        optax.trace(decay=momentum, nesterov=True),
    )


OPTIMISERS = ("lars", "sgd", "adam")
LARS_MODES = ("simclr", "as_written")
LR_STEPPINGS = ("epoch", "step")
NO_WARMUP_PEAKS = ("unscaled", "scaled")


def build_optimiser(name: str, learning_rate: float | optax.Schedule, *, weight_decay: float, params: Any,
                    lars_mode: str = "simclr", lars_eta: float = 1e-3,
                    momentum: float = 0.9) -> optax.GradientTransformation:
    """`lars` | `sgd` (Nesterov, torch-style L2 weight decay) | `adam` (L2 weight decay)."""
    if name == "lars":
        return lars(learning_rate, weight_decay=weight_decay, trust_coefficient=lars_eta,
                    momentum=momentum, mode=lars_mode, params=params)
    if name == "sgd":
        return optax.chain(optax.add_decayed_weights(weight_decay),
                           optax.sgd(learning_rate, momentum=momentum, nesterov=True))
    if name == "adam":
        return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))
    raise ValueError(f"unknown optimiser {name!r}")


def pretrain_lr_schedule(*, base_lr: float, batch_size: int, n_epochs: int, warmup_epochs: int, steps_per_epoch: int,
                         stepping: str = "epoch", epoch0_zero_lr: bool = False,
                         no_warmup_peak: str = "unscaled") -> Callable[[jax.Array], jax.Array]:
    """lr(step) of DIFFERENCES.md, learning-rate schedule: linear warmup to the unscaled peak, then cosine that never reaches 0.

    Epoch k (0-indexed), T = E - W:
      k < W:  lr = LR*(k+1)/W  (as written, B-6: epoch 0 runs at LR*1e-12/W and epoch k at LR*k/W)
      k >= W: lr = LR*(1 + cos(pi*(k - W)/T))/2
    With W = 0 the cosine starts from LR, the same peak as with warmup; `no_warmup_peak="scaled"` starts
    it from LR*B/256, as the original's optimiser is built (B-6). `stepping="step"` evaluates the same
    curve at the fractional epoch of each step instead of holding it constant over the epoch.
    """
    total = max(n_epochs - warmup_epochs, 1)

    def cosine(epoch: jax.Array) -> jax.Array:
        return base_lr * 0.5 * (1 + jnp.cos(math.pi * (epoch - warmup_epochs) / total))

    def schedule(step: jax.Array) -> jax.Array:
        if warmup_epochs == 0:
            epoch = step // steps_per_epoch if stepping == "epoch" else step / steps_per_epoch
            peak = base_lr * batch_size / 256 if no_warmup_peak == "scaled" else base_lr
            return peak * 0.5 * (1 + jnp.cos(math.pi * epoch / n_epochs))
        if stepping == "step":
            epoch = (step + 1) / steps_per_epoch
            return jnp.where(epoch < warmup_epochs, base_lr * epoch / warmup_epochs, cosine(epoch))
        epoch = step // steps_per_epoch
        if epoch0_zero_lr:
            warm = jnp.where(epoch < 1, base_lr * 1e-12 / warmup_epochs, base_lr * epoch / warmup_epochs)
            return jnp.where(epoch <= warmup_epochs, warm, cosine(epoch))
        return jnp.where(epoch < warmup_epochs, base_lr * (epoch + 1) / warmup_epochs, cosine(epoch))

    return schedule


def finetune_lr_schedule(*, base_lr: float, batch_size: int, epochs: int,
                         steps_per_epoch: int) -> Callable[[jax.Array], jax.Array]:
    """Linear-eval lr: lr0*(1 + cos(pi*epoch/F))/2 per epoch with lr0 = finetune_lr*B/256 (DIFFERENCES.md, linear evaluation)."""
    lr0 = base_lr * batch_size / 256

    def schedule(step: jax.Array) -> jax.Array:
        epoch = (step // steps_per_epoch).astype(jnp.float32)
        return lr0 * 0.5 * (1 + jnp.cos(math.pi * epoch / epochs))

    return schedule


@dataclasses.dataclass(frozen=True)
class Optimisation:
    """The pretraining optimisers and schedule (config keys of the same names; `name` is `optimiser`)."""

    name: str
    learning_rate: float
    weight_decay: float
    lars_mode: str
    lars_eta: float
    momentum: float
    grad_clip_norm: float
    warmup_epochs: int
    lr_stepping: str
    epoch0_zero_lr: bool
    no_warmup_peak: str

    def classifier_learning_rate(self, batch_size: int) -> float:
        """The prototype classifier's SGD lr: learning_rate * B / 256, as the original's."""
        return self.learning_rate * batch_size / 256


def pretrain_optimisers(optimisation: Optimisation, *, batch_size: int, n_epochs: int, steps_per_epoch: int,
                        params: Any) -> tuple[Callable, optax.GradientTransformation, optax.GradientTransformation]:
    """(schedule, the network's optimiser, the prototype classifier's SGD with weight decay) of a pretraining run."""
    o = optimisation
    schedule = pretrain_lr_schedule(
        base_lr=o.learning_rate, batch_size=batch_size, n_epochs=n_epochs, warmup_epochs=o.warmup_epochs,
        steps_per_epoch=steps_per_epoch, stepping=o.lr_stepping, epoch0_zero_lr=o.epoch0_zero_lr,
        no_warmup_peak=o.no_warmup_peak)
    tx = build_optimiser(o.name, schedule, weight_decay=o.weight_decay, params=params, lars_mode=o.lars_mode,
                         lars_eta=o.lars_eta, momentum=o.momentum)
    if o.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
    classifier_tx = optax.chain(optax.add_decayed_weights(o.weight_decay),
                                optax.sgd(o.classifier_learning_rate(batch_size)))
    return schedule, tx, classifier_tx
