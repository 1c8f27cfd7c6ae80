"""SPCL on Tiny ImageNet (200 classes, 64 px, CIFAR stem); the original crashes here (DIFFERENCES.md, B-14).

    python launch.py --config configs/tinyimagenet.py --config.dataset_path=/path/to/tiny-imagenet-200

Hardware: one GPU; bfloat16. Test = the official val split. Expected: not yet measured.
"""
from configs import default


def get_config():
    config = default.get_config()
    config.dataset = 'tinyimagenet'
    config.image_size = 64
    config.n_classes = 200
    config.pre_classes = 200
    config.dtype = 'bfloat16'
    config.val_sample = 50
    return config
