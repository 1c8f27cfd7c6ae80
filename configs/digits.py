"""The embedded default: SPCL on scikit-learn's bundled handwritten digits, offline, on a CPU.

    python launch.py --config configs/digits.py

Hardware: 2 CPU cores (no accelerator needed). 1,797 real 8x8 digits (10 classes) upscaled to
16 px, a narrow ResNet-18 (width 1/8), SPCL pretraining, then linear and kNN evaluation.
Expected: time and linear-probe test top-1 not yet measured.
"""
from configs import default


def get_config():
    config = default.get_config()
    config.dataset = 'digits'
    config.image_size = 16
    config.n_classes = 10
    config.pre_classes = 10
    config.val_sample = 0
    config.width_multiplier = 0.125
    config.batch_size = 128
    config.num_prototypes = 30
    config.pca_dim = 32
    config.n_epochs = 30
    config.warmup_epochs = 3
    config.finetune_epochs = 100
    config.finetune_batch_size = 128
    config.knn_k = 20
    config.log_every_steps = 5
    config.crop_scale = (0.5, 1.0)
    return config
