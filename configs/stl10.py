"""SPCL on STL-10: pretraining on train + unlabeled (105k images), evaluation on the 10 classes.

    python -m spcl_jax.data.prepare stl10        # once
    python launch.py --config configs/stl10.py

Hardware: one or more GPUs or a TPU slice; bfloat16; 96 px, ImageNet stem. Unlike the original
(DIFFERENCES.md, B-14) the pretrain views get the standard colour augmentations. Expected: not yet measured.
"""
from configs import default


def get_config():
    config = default.get_config()
    config.dataset = 'stl10'
    config.image_size = 96
    config.n_classes = 10
    config.pre_classes = 10
    config.dtype = 'bfloat16'
    config.stem = 'imagenet'
    config.val_sample = 50
    config.crop_scale = (0.008, 1.0)  # the original's STL-10 crops, as ImageNet's
    return config
