"""The embedded offline dataset: scikit-learn's bundled handwritten digits (1,797 real 8x8 images).

No download is possible on the development machines, so this is the dataset on which a run can
produce meaningful k-means/kNN/linear accuracies end to end. The 8x8 values 0..16 are resized
bilinearly to the configured size, scaled to 0..255 and repeated to three channels.
"""
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

NUM_CLASSES = 10
TEST_SIZE = 450  # fixed stratified test split: 1,347 train / 450 test
SPLIT_SEED = 0  # independent of config.seed so every run is tested on the same images


def resize_digits(images: np.ndarray, size: int) -> np.ndarray:
    """float (n, 8, 8) in 0..16 -> uint8 (n, size, size, 3) in 0..255."""
    out = np.empty((len(images), size, size), np.float32)
    for i, image in enumerate(images):
        out[i] = np.asarray(Image.fromarray(image.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))
    out = np.clip(np.round(out * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return np.repeat(out[..., None], 3, axis=-1)


def digits_arrays(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_images, train_labels, test_images, test_labels), images uint8 (n, size, size, 3)."""
    digits = load_digits()
    labels = digits.target.astype(np.int64)
    train, test = train_test_split(
        np.arange(len(labels)), test_size=TEST_SIZE, stratify=labels, random_state=SPLIT_SEED
    )
    train, test = np.sort(train), np.sort(test)
    images = resize_digits(digits.images, size)
    return images[train], labels[train], images[test], labels[test]


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units (the normalisation constants)."""
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return tuple(float(v) for v in x.mean(0)), tuple(float(v) for v in x.std(0))
