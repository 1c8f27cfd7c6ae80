"""SPCL on ImageNet-100 with ResNet-50: the original's 100 classes (the first 100 wnids).

    python launch.py --config configs/imagenet100.py --config.dataset_path=/path/to/imagenet

Hardware: 8 GPUs or a TPU slice; bfloat16. Unlike the original (DIFFERENCES.md, B-14) the pretrain views are
normalised. `--config.imagenet100_classes=cmc` takes the CMC paper's list instead, which most published
ImageNet-100 numbers use. Linear evaluation with the original protocol. Expected time and top-1: not
yet measured.
"""
from configs import default


def get_config():
    config = default.get_config()
    config.dataset = 'imagenet100'
    config.image_size = 224
    config.n_classes = 100
    config.pre_classes = 100
    config.model = 'resnet50'
    config.dtype = 'bfloat16'
    config.blur = True
    config.crop_scale = (0.008, 1.0)
    config.val_sample = 50
    return config
