"""SPCL on CIFAR-100 (full training set, all 100 classes in pretraining and evaluation).

    python -m spcl_jax.data.prepare cifar100     # once
    python launch.py --config configs/cifar100.py

Hardware: one GPU or a TPU slice; bfloat16. Expected time and top-1: not yet measured.
"""
from configs import default


def get_config():
    config = default.get_config()
    config.dataset = 'cifar100'
    config.image_size = 32
    config.n_classes = 100
    config.pre_classes = 100
    config.dtype = 'bfloat16'
    return config
