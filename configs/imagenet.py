"""SPCL on ImageNet-1k with ResNet-50, the paper's headline setting.

    python -m spcl_jax.data.prepare imagenet --dataset_path /path/to/imagenet --out /path/to/records  # once
    python launch.py --config configs/imagenet.py --config.dataset_path=/path/to/records

`dataset_path` is the prepared records (5x cheaper to decode than the JPEG files, BENCHMARKS.md) or the
ImageNet folder itself (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG); tfds imagenet2012 prepared with
`python -m spcl_jax.data.prepare imagenet` works too. Hardware: a TPU pod slice or several GPU hosts;
bfloat16 (`--config.remat=block` if a batch does not fit: `python -m spcl_jax.plan` finds the largest that does). Blur and crop scale
(0.008, 1) as the original, crops from the whole image. 50 images per class held out for validation.
Expected time and top-1: not yet measured.
"""
from configs import default


def get_config():
    config = default.get_config()
    config.dataset = 'imagenet'
    config.image_size = 224
    config.n_classes = 1000
    config.pre_classes = 1000
    config.model = 'resnet50'
    config.dtype = 'bfloat16'
    config.blur = True
    config.crop_scale = (0.008, 1.0)
    config.val_sample = 50
    config.pca_dim = 256
    return config
