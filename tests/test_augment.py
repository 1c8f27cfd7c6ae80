"""Properties of the on-device augmentation (spec §4.3)."""
import colorsys
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs.default import get_config
from spcl_jax import augment
from spcl_jax.errors import ConfigError

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
BASE = augment.AugmentParams(image_size=8, mean=MEAN, std=STD, blur=True)
CROP_FIRST = dataclasses.replace(BASE, aug_order="crop_first")
OFF = dataclasses.replace(BASE, jitter_p=0.0, grey_p=0.0, blur_p=0.0, crop_scale=(1.0, 1.0))


def _images(n=16, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@functools.partial(jax.jit, static_argnums=2)
def _pretrain(key, images, params):
    return augment.pretrain_view(key, images, params)


@functools.partial(jax.jit, static_argnums=2)
def _train(key, images, params):
    return augment.train_view(key, images, params)


def _normalised(images):
    return (images.astype(np.float32) / 255.0 - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)


def _bounds(params):
    lo = (0.0 - np.asarray(params.mean)) / np.asarray(params.std)
    hi = (1.0 - np.asarray(params.mean)) / np.asarray(params.std)
    return lo - 1e-5, hi + 1e-5


def _flip_of(out, expected):
    """Per image: True if `out` is `expected` unflipped, False if flipped, None if neither."""
    plain = np.isclose(out, expected, atol=1e-5).all(axis=(1, 2, 3))
    flipped = np.isclose(out, expected[:, :, ::-1], atol=1e-5).all(axis=(1, 2, 3))
    assert (plain | flipped).all()
    return plain


@pytest.mark.slow
def test_views_shapes_dtypes_ranges():
    images = _images()
    lo, hi = _bounds(BASE)
    for out in (
        _pretrain(jax.random.key(0), images, BASE),
        _pretrain(jax.random.key(0), images, CROP_FIRST),
        _train(jax.random.key(0), images, OFF),
        augment.eval_view(images, BASE),
    ):
        assert out.shape == (16, 8, 8, 3) and out.dtype == jnp.float32
        out = np.asarray(out)
        assert np.isfinite(out).all() and (out >= lo).all() and (out <= hi).all()


def test_same_key_same_output_different_keys_differ():
    images = _images()
    a = np.asarray(_pretrain(jax.random.key(1), images, BASE))
    b = np.asarray(_pretrain(jax.random.key(1), images, BASE))
    c = np.asarray(_pretrain(jax.random.key(2), images, BASE))
    np.testing.assert_array_equal(a, b)
    assert all(not np.allclose(a[i], c[i]) for i in range(len(a)))
    identical = np.stack([images[0]] * 16)  # the same image gets a different view at every position
    views = np.asarray(_pretrain(jax.random.key(3), identical, BASE))
    assert len({v.tobytes() for v in views}) == 16


def test_orders_differ():
    images = _images()
    first = np.asarray(_pretrain(jax.random.key(6), images, BASE))
    crop_first = np.asarray(_pretrain(jax.random.key(6), images, CROP_FIRST))
    assert not np.allclose(first, crop_first)


@pytest.mark.slow
def test_probability_zero_leaves_image_up_to_flip():
    images = _images()
    plain = _flip_of(np.asarray(_pretrain(jax.random.key(4), images, OFF)), _normalised(images))
    assert plain.any() and not plain.all()  # flip p=0.5 over 16 images


@pytest.mark.slow
def test_probability_one_always_applies():
    images = _images()
    params = dataclasses.replace(OFF, grey_p=1.0, blur_p=1.0, blur_sigma=(1.2, 1.2))
    out = np.asarray(_pretrain(jax.random.key(5), images, params))
    expected = jax.jit(jax.vmap(lambda x: augment.normalise(augment.gaussian_blur(augment.grayscale(augment.to_unit(x)), 1.2, 4), MEAN, STD)))
    _flip_of(out, np.asarray(expected(images)))
    unit = out * np.asarray(STD) + np.asarray(MEAN)
    np.testing.assert_allclose(unit[..., 0], unit[..., 1], atol=1e-5)
    np.testing.assert_allclose(unit[..., 1], unit[..., 2], atol=1e-5)
    jittered = np.asarray(_pretrain(jax.random.key(5), images, dataclasses.replace(OFF, jitter_p=1.0)))
    base = np.asarray(_pretrain(jax.random.key(5), images, OFF))
    assert all(not np.allclose(jittered[i], base[i], atol=1e-3) for i in range(len(base)))


def test_flip_is_exact():
    x = jnp.asarray(_images(1)[0], jnp.float32)
    np.testing.assert_array_equal(augment.hflip(x, True), x[:, ::-1])
    np.testing.assert_array_equal(augment.hflip(x, False), x)


def test_train_view_is_crop_flip_only():
    images = _images()
    _flip_of(np.asarray(_train(jax.random.key(7), images, OFF)), _normalised(images))


def test_eval_view_is_centre_crop():
    images = _images(size=16)  # int(0.875 * 16) = 14 = S: a pure centre crop
    out = np.asarray(augment.eval_view(images, dataclasses.replace(BASE, image_size=14)))
    np.testing.assert_allclose(out, _normalised(images[:, 1:15, 1:15]), atol=1e-5)
    flat = np.full((2, 32, 32, 3), 77, np.uint8)  # CIFAR: crop 28 -> resize 32 keeps a flat image flat
    out = np.asarray(augment.eval_view(flat, dataclasses.replace(BASE, image_size=32)))
    np.testing.assert_allclose(out, _normalised(flat), atol=1e-5)


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.3, 0.4), (1.0, 1.0)])
def test_crop_box_respects_scale_ratio_and_bounds(scale):
    height, width = 64, 48
    u = jax.random.uniform(jax.random.key(8), (500, augment.CROP_DRAWS))
    boxes = jax.jit(jax.vmap(lambda v: augment.sample_crop_box(v, height, width, scale)))
    top, left, h, w = (np.asarray(v) for v in boxes(u))
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    fallback = (h == height) & (w == width)  # the centre fallback of a 4:3 image with ratio 0.75 in range
    drawn = ~fallback
    # rounding each side to whole pixels moves the area fraction by at most ~(h + w) / 2 / area
    slack = (h + w) / 2.0 / (height * width) + 1e-6
    frac = h * w / (height * width)
    assert ((frac >= scale[0] - slack) & (frac <= scale[1] + slack))[drawn].all()
    ratio = w / h
    assert ((ratio >= 0.75 * 0.9) & (ratio <= 4 / 3 * 1.1))[drawn].all()
    if scale == (0.08, 1.0):
        assert drawn.mean() > 0.9 and frac.min() < 0.2 and frac.max() > 0.8


def test_crop_box_fallback_clamps_ratio():
    u = jax.random.uniform(jax.random.key(9), (augment.CROP_DRAWS,))
    top, left, h, w = augment.sample_crop_box(u, 10, 100, (0.99, 1.0))
    assert (int(h), int(w), int(top), int(left)) == (10, 13, 0, 43)


def test_hue_matches_colorsys():
    rgb = np.random.default_rng(10).random((50, 3)).astype(np.float32)
    shift = 0.13
    out = np.asarray(augment.adjust_hue(jnp.asarray(rgb), shift))
    expected = []
    for r, g, b in rgb:
        h, s, v = colorsys.rgb_to_hsv(r, g, b)
        expected.append(colorsys.hsv_to_rgb((h + shift) % 1.0, s, v))
    np.testing.assert_allclose(out, np.asarray(expected), atol=1e-5)


def test_colour_ops_identity_at_neutral_factors():
    x = jnp.asarray(np.random.default_rng(11).random((5, 5, 3)), jnp.float32)
    for op, neutral in ((augment.adjust_brightness, 1.0), (augment.adjust_contrast, 1.0), (augment.adjust_saturation, 1.0), (augment.adjust_hue, 0.0)):
        np.testing.assert_allclose(op(x, neutral), x, atol=1e-5)


@pytest.mark.parametrize("size", [3, 20])  # smaller and larger than the kernel radius
def test_blur_matches_padded_convolution(size):
    radius = 6
    blur = jax.jit(augment.gaussian_blur, static_argnums=2)
    x = np.random.default_rng(13).random((size, size + 2, 3)).astype(np.float32)
    for sigma in (0.1, 1.3, 2.0):
        w = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
        w /= w.sum()
        p = np.pad(x, ((radius, radius), (0, 0), (0, 0)), mode="edge")
        y = sum(w[t] * p[t : t + size] for t in range(2 * radius + 1))
        p = np.pad(y, ((0, 0), (radius, radius), (0, 0)), mode="edge")
        y = sum(w[t] * p[:, t : t + size + 2] for t in range(2 * radius + 1))
        np.testing.assert_allclose(blur(x, sigma, radius), y, atol=1e-5)


def test_from_config_and_validation():
    config = get_config()
    config.jitter_d, config.image_size, config.blur, config.crop_scale = 0.5, 96, True, (0.2, 1.0)
    params = augment.AugmentParams.from_config(config, MEAN, STD)
    assert params.jitter == (0.4, 0.4, 0.4, 0.1) and params.image_size == 96 and params.blur
    assert params.crop_scale == (0.2, 1.0) and params.mean == MEAN and params.aug_order == "colour_first"
    hash(params)
    with pytest.raises(ConfigError, match="aug_order"):
        dataclasses.replace(params, aug_order="random")


@pytest.mark.slow
def test_sharded_matches_unsharded():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    images = _images(16)
    sharded = jax.device_put(images, NamedSharding(mesh, P("data")))
    key = jax.random.key(12)
    for fn, params in ((_pretrain, BASE), (_train, OFF)):
        expected = np.asarray(fn(key, images, params))
        out = fn(key, sharded, params)
        assert out.sharding.spec[0] == "data"
        np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)
