"""The host-side crop boxes against a plain re-implementation of torchvision's algorithm."""
import math

import numpy as np
import pytest
from scipy import stats

from spcl_jax.data import crops


def torchvision_get_params(uniform, randint, height, width, scale, ratio):
    """torchvision.transforms.RandomResizedCrop.get_params, line by line; `uniform(lo, hi)` and
    `randint(lo, hi)` stand for torch's draws."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * uniform(scale[0], scale[1])
        aspect_ratio = math.exp(uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = randint(0, height - h + 1)
            j = randint(0, width - w + 1)
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


def reference_boxes(rng, n, height, width, scale):
    return [torchvision_get_params(rng.uniform, lambda lo, hi: int(rng.integers(lo, hi)), height, width, scale,
                                   crops.CROP_RATIO) for _ in range(n)]


def _summaries(boxes, height, width):
    top, left, h, w = np.asarray(boxes, np.float64).T
    return {"area": h * w / (height * width), "log_aspect": np.log(w / h),
            "top": (top + 0.5) / (height - h + 1), "left": (left + 0.5) / (width - w + 1)}


@pytest.mark.parametrize("height,width,scale", [
    (375, 500, (0.08, 1.0)), (500, 375, (0.008, 1.0)), (32, 32, (0.08, 1.0)), (64, 48, (0.3, 0.4)),
    (40, 200, (0.5, 1.0)), (16, 16, (0.5, 1.0))])
def test_boxes_are_distributed_as_torchvision(height, width, scale):
    n = 6000
    reference_rng, rng = np.random.default_rng(0), np.random.default_rng(1)
    reference = reference_boxes(reference_rng, n, height, width, scale)
    ours = [crops.random_resized_crop_box(rng, height, width, scale) for _ in range(n // 2)]
    u = np.random.default_rng(2).random((n // 2, crops.CROP_DRAWS))
    vectorised = crops.random_resized_crop_boxes(u, np.full(n // 2, height), np.full(n // 2, width), scale)
    theirs = _summaries(reference, height, width)
    for name, mine in _summaries(np.concatenate([ours, vectorised]), height, width).items():
        assert stats.ks_2samp(mine, theirs[name]).pvalue > 1e-3, name
    boxes = np.concatenate([ours, vectorised])
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 0] + boxes[:, 2] <= height).all() and (boxes[:, 1] + boxes[:, 3] <= width).all()


def test_same_uniforms_same_boxes_as_the_reference():
    """Fed the same numbers, the vectorised sampler returns torchvision's boxes exactly."""
    u = np.random.default_rng(3).random((400, crops.CROP_DRAWS))
    for height, width, scale in ((375, 500, (0.08, 1.0)), (20, 300, (0.9, 1.0)), (300, 20, (0.9, 1.0)),
                                 (33, 31, (0.008, 1.0))):
        ours = crops.random_resized_crop_boxes(u, np.full(len(u), height), np.full(len(u), width), scale)
        for row, box in zip(u, ours):
            attempts = iter(np.stack([row[:crops.CROP_ATTEMPTS], row[crops.CROP_ATTEMPTS:2 * crops.CROP_ATTEMPTS]],
                                     axis=1).reshape(-1))
            positions = iter(row[-2:])
            expected = torchvision_get_params(lambda lo, hi: lo + next(attempts) * (hi - lo),
                                              lambda lo, hi: lo + int(next(positions) * (hi - lo)),
                                              height, width, scale, crops.CROP_RATIO)
            assert tuple(box) == expected, (height, width, scale, box, expected)


def test_fallback_clamps_the_ratio():
    rng = np.random.default_rng(9)
    assert crops.random_resized_crop_box(rng, 10, 100, (0.99, 1.0)) == (0, 43, 10, 13)
    assert crops.random_resized_crop_box(rng, 100, 10, (0.99, 1.0)) == (43, 0, 13, 10)


def test_center_crop_boxes_in_original_pixels():
    # CIFAR: CenterCrop(28) of a 32x32 image stored as it is.
    np.testing.assert_array_equal(crops.center_crop_boxes([32], [32], [32], [32], 28), [[2, 2, 28, 28]])
    # ImageNet: CenterCrop(196) of a 500x375 file stored at 341x256: the box in stored pixels.
    box = crops.center_crop_boxes([256], [341], [375], [500], 196)[0]
    np.testing.assert_allclose(box, np.array([90, 152, 196, 196]) * (256 / 375), rtol=2e-3)
    # A crop bigger than the image is clamped to it.
    np.testing.assert_array_equal(crops.center_crop_boxes([20], [30], [20], [30], 28), [[0, 1, 20, 28]])
    assert crops.eval_crop(224) == 196 and crops.eval_crop(32) == 28


def test_counter_uniforms_are_uniform_independent_and_keyed():
    u = crops.counter_uniforms((420, 3, 7), np.arange(20000), 3)
    for column in range(3):
        assert stats.kstest(u[:, column], "uniform").pvalue > 1e-3
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.03 and abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < 0.03
    np.testing.assert_array_equal(crops.counter_uniforms((420, 3, 7), np.array([5, 9]), 3), u[[5, 9]])
    assert not np.array_equal(crops.counter_uniforms((420, 3, 8), np.array([5]), 3), u[[5]])
    assert ((u >= 0) & (u < 1)).all()
