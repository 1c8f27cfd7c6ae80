"""SPCL on CIFAR-10 with the original config.conf recipe and the full training set.

    python -m spcl_jax.data.prepare cifar10      # once
    python launch.py --config configs/cifar10.py

Hardware: one GPU (H100/H200) or a TPU slice; bfloat16 compute. ResNet-18 (CIFAR stem), batch 512,
1000 epochs, K=512. Expected time and linear-probe top-1: not yet measured.
"""
from configs import default


def get_config():
    config = default.get_config()
    config.dataset = 'cifar10'
    config.image_size = 32
    config.n_classes = 10
    config.pre_classes = 10
    config.dtype = 'bfloat16'
    return config
