"""Crop boxes and per-view random draws, on the host with numpy (DIFFERENCES.md, augmentation recipes and D-12).

Every view of an image is described by a box in the stored image's pixels and a vector of uniforms
for the flip and the colour ops; `spcl_jax.augment` turns (image, box, uniforms) into the view on the
device. Drawing them here, from a numpy Generator seeded by (seed, epoch, step), makes each view a
pure function of the run's seed and its place in the epoch's plan, whatever the device count.

`random_resized_crop_box` is torchvision's `RandomResizedCrop.get_params`: area fraction uniform in
`scale`, log aspect ratio uniform in `log(ratio)`, 10 attempts, then the centre-crop fallback with
the ratio clamped. `random_resized_crop_boxes` is the same for many images from drawn uniforms.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import numpy.typing as npt

CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10
CROP_DRAWS = 2 * CROP_ATTEMPTS + 2  # areas, log-ratios, top, left
EVAL_CROP_FRACTION = 0.875  # the original's eval view: CenterCrop(0.875 S) -> Resize(S)
# Uniforms per view for the device: flip, then colour jitter (order: 4, factors: 4), jitter coin, grey coin,
# blur sigma, blur coin.
FLIP_DRAW = 0
JITTER_DRAWS = 8
PHOTOMETRIC_DRAWS = JITTER_DRAWS + 4
VIEW_DRAWS = 1 + PHOTOMETRIC_DRAWS


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(z):
    """SplitMix64's finaliser on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def counter_uniforms(seed: Iterable[int], ids: npt.ArrayLike, count: int) -> np.ndarray:
    """(len(ids), count) float64 uniforms in [0, 1), a pure function of (seed words, id): row i is the
    SplitMix64 stream of a state hashed from `seed` and ids[i]. So an image's views depend on its id (its
    place in an epoch's plan, or its dataset index) and nothing else: not on the batch it falls in, the
    host that loads it or the device that augments it."""
    key = np.uint64(0)
    for word in seed:
        key = _mix(np.asarray(key ^ np.uint64(int(word) & 0xFFFFFFFFFFFFFFFF), np.uint64) + _GOLDEN)
    with np.errstate(over="ignore"):
        state = _mix(key ^ _mix(np.asarray(ids, np.int64).astype(np.uint64) + _GOLDEN))
        z = _mix(state[:, None] + _GOLDEN * np.arange(1, count + 1, dtype=np.uint64))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def random_resized_crop_boxes(u: npt.ArrayLike, heights: npt.ArrayLike, widths: npt.ArrayLike, scale: Sequence[float],
                              ratio: Sequence[float] = CROP_RATIO) -> np.ndarray:
    """(n, 4) int64 boxes (top, left, h, w) from (n, CROP_DRAWS) uniforms for images of the given sizes."""
    u = np.asarray(u, np.float64)
    heights = np.asarray(heights, np.int64)[:, None]
    widths = np.asarray(widths, np.int64)[:, None]
    area_u, ratio_u = u[:, :CROP_ATTEMPTS], u[:, CROP_ATTEMPTS:2 * CROP_ATTEMPTS]
    target = heights * widths * (scale[0] + area_u * (scale[1] - scale[0]))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + ratio_u * (log_hi - log_lo))
    ws = np.round(np.sqrt(target * aspect)).astype(np.int64)  # round half to even, as Python's round()
    hs = np.round(np.sqrt(target / aspect)).astype(np.int64)
    fits = (ws > 0) & (ws <= widths) & (hs > 0) & (hs <= heights)
    found = fits.any(axis=1)
    first = np.argmax(fits, axis=1)
    rows = np.arange(len(u))
    heights, widths = heights[:, 0], widths[:, 0]
    fallback_h, fallback_w = _fallback(heights, widths, ratio)
    h = np.where(found, hs[rows, first], fallback_h)
    w = np.where(found, ws[rows, first], fallback_w)
    top = np.minimum(np.floor(u[:, -2] * (heights - h + 1)).astype(np.int64), heights - h)
    left = np.minimum(np.floor(u[:, -1] * (widths - w + 1)).astype(np.int64), widths - w)
    top = np.where(found, top, (heights - h) // 2)
    left = np.where(found, left, (widths - w) // 2)
    return np.stack([top, left, h, w], axis=1)


def _fallback(heights, widths, ratio):
    """torchvision's fallback box: the whole image with its aspect ratio clamped into `ratio`."""
    in_ratio = widths / heights
    h = np.where(in_ratio > ratio[1], heights, np.where(in_ratio < ratio[0], np.round(widths / ratio[0]), heights))
    w = np.where(in_ratio > ratio[1], np.round(heights * ratio[1]), widths)
    return h.astype(np.int64), w.astype(np.int64)


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int, scale: Sequence[float],
                            ratio: Sequence[float] = CROP_RATIO) -> tuple[int, ...]:
    """torchvision's RandomResizedCrop.get_params: (top, left, h, w) ints, from a numpy Generator."""
    box = random_resized_crop_boxes(rng.random((1, CROP_DRAWS)), [height], [width], scale, ratio)[0]
    return tuple(int(v) for v in box)


def center_crop_boxes(heights: npt.ArrayLike, widths: npt.ArrayLike, raw_heights: npt.ArrayLike,
                      raw_widths: npt.ArrayLike, crop: float) -> np.ndarray:
    """(n, 4) float boxes of torchvision's CenterCrop(crop) on the raw images, in stored pixels.

    `crop` is in pixels of the raw (original) image, as the original applies it to the file it reads;
    images are stored at (heights, widths), a scaled copy of (raw_heights, raw_widths). A crop larger
    than the image is clamped to it (torchvision pads with black instead).
    """
    raw = np.stack([raw_heights, raw_widths], axis=1).astype(np.float64)
    stored = np.stack([heights, widths], axis=1).astype(np.float64)
    size = np.minimum(float(crop), raw)
    start = np.round((raw - size) / 2.0)
    factor = stored / raw
    return np.concatenate([start * factor, size * factor], axis=1)


def eval_crop(image_size: int) -> int:
    """Side of the original's eval centre crop for crop size S: int(0.875 S) (28 for 32, 196 for 224)."""
    return int(EVAL_CROP_FRACTION * image_size)
