"""`load_encoder`: a pretrained encoder as a plain function from images to features, for use in JAX.

    encode = spcl_jax.load_encoder("runs/cifar10/<stamp>/checkpoints")
    features = encode(images)  # (n, H, W, 3) uint8 or normalised float -> (n, D)

The network is rebuilt from the config saved with the checkpoint, so nothing about the run needs to be
passed; BatchNorm is in eval mode (running statistics), as in evaluation.
"""
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.typing import ArrayLike

from spcl_jax import augment, checkpoint, network, startup
from spcl_jax import config_validation
from spcl_jax.data import datasets
from spcl_jax.errors import UserError


def load_encoder(checkpoint_dir: str | os.PathLike, step: int | None = None) -> Callable[[ArrayLike], jax.Array]:
    """encode(images) -> (n, D) features of the encoder saved at `step` (None = newest) in `checkpoint_dir`
    (a run's <workdir>/checkpoints, relative or absolute).

    `images` are NHWC at any size (not cropped or resized). uint8 images are scaled to [0, 1] and normalised
    with the mean and std of the run's dataset, as in training; float images are taken as already normalised.
    """
    if step is not None and step < 0:
        raise UserError(f"step={step}; valid: None (the newest) or a saved step >= 0")
    step = -1 if step is None else step
    config, step = checkpoint.restore_config(checkpoint_dir, step)
    config = ml_collections.ConfigDict(config)
    method = config_validation.method_of(config)
    graphdef, params, batch_stats, _ = network.restore(startup.architecture(config), method, config.n_classes,
                                                       config.seed, checkpoint_dir, step)
    mean, std = datasets.normalisation(config.dataset, config.image_size)

    @jax.jit
    def encode(params: Any, batch_stats: Any, images: jax.Array) -> jax.Array:
        net = nnx.merge(graphdef, params, batch_stats, copy=True)
        net.encoder.eval()
        if images.dtype == jnp.uint8:
            images = augment.normalise(augment.to_unit(images), mean, std)
        return net.encoder(images)

    params, batch_stats = jax.device_put((params, batch_stats))
    return lambda images: encode(params, batch_stats, jnp.asarray(images))
