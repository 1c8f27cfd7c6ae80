"""The on-device augmentation (DIFFERENCES.md, augmentation recipes) from host-drawn boxes and uniforms."""
import colorsys
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from configs.default import get_config
from spcl_jax import augment, startup
from spcl_jax.data import crops, decode, pipeline
from spcl_jax.data.sources import ArraySource, empty_images

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
BASE = augment.AugmentParams(image_size=8, mean=MEAN, std=STD, blur=True)
CROP_FIRST = dataclasses.replace(BASE, aug_order="crop_first")
OFF = dataclasses.replace(BASE, jitter_p=0.0, grey_p=0.0, blur_p=0.0)
WHOLE = pipeline.Recipe(crop_scale=(1.0, 1.0), eval_crop=7)  # boxes = the whole (square) image
RECIPE = pipeline.Recipe(crop_scale=(0.08, 1.0), eval_crop=7)


def _images(n=16, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _batch(images, specs, recipe=RECIPE, seed=(0,)):
    """The host batch of one step over `images` (view v of image i from plan position i)."""
    source = ArraySource(images, np.zeros(len(images)))
    maker = pipeline.make_pass(source, {"a": np.arange(len(images))[None]}, specs, recipe, seed)
    return maker(0)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _views(batch, specs, params):
    return augment.views(batch, specs, params)


def _view(images, kind, params, recipe=RECIPE, seed=(0,)):
    specs = (("a", kind),)
    return np.asarray(_views(_batch(images, specs, recipe, seed), specs, params)[0])


def _normalised(images):
    return (images.astype(np.float32) / 255.0 - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)


def _bounds(params):
    lo = (0.0 - np.asarray(params.mean)) / np.asarray(params.std)
    hi = (1.0 - np.asarray(params.mean)) / np.asarray(params.std)
    return lo - 1e-5, hi + 1e-5


def _flip_of(out, expected):
    """Per image: True if `out` is `expected` unflipped, False if flipped; fails if neither."""
    plain = np.isclose(out, expected, atol=1e-5).all(axis=(1, 2, 3))
    flipped = np.isclose(out, expected[:, :, ::-1], atol=1e-5).all(axis=(1, 2, 3))
    assert (plain | flipped).all()
    return plain


def test_views_shapes_dtypes_ranges():
    images = _images()
    lo, hi = _bounds(BASE)
    for kind, params in (("pretrain", BASE), ("pretrain", CROP_FIRST), ("train", OFF), ("eval", BASE)):
        out = _view(images, kind, params)
        assert out.shape == (16, 8, 8, 3) and out.dtype == np.float32
        assert np.isfinite(out).all() and (out >= lo).all() and (out <= hi).all()


def test_views_depend_on_the_seed_and_the_position_only():
    images = _images()
    a, b = _view(images, "pretrain", BASE, seed=(1,)), _view(images, "pretrain", BASE, seed=(1,))
    c = _view(images, "pretrain", BASE, seed=(2,))
    np.testing.assert_array_equal(a, b)
    assert all(not np.allclose(a[i], c[i]) for i in range(len(a)))
    identical = np.stack([images[0]] * 16)  # the same image gets a different view at every position
    views = _view(identical, "pretrain", BASE, seed=(3,))
    assert len({v.tobytes() for v in views}) == 16


def test_orders_differ():
    images = _images()
    assert not np.allclose(_view(images, "pretrain", BASE, seed=(6,)), _view(images, "pretrain", CROP_FIRST, seed=(6,)))


def test_probability_zero_leaves_the_whole_image_up_to_flip():
    images = _images()
    plain = _flip_of(_view(images, "pretrain", OFF, WHOLE, seed=(4,)), _normalised(images))
    assert plain.any() and not plain.all()  # flip p=0.5 over 16 images


def test_probability_one_always_applies():
    images = _images()
    params = dataclasses.replace(OFF, grey_p=1.0, blur_p=1.0, blur_sigma=(1.2, 1.2))
    out = _view(images, "pretrain", params, WHOLE, seed=(5,))
    expected = jax.jit(jax.vmap(lambda x: augment.normalise(augment.gaussian_blur(augment.grayscale(augment.to_unit(x)), 1.2, 4), MEAN, STD)))
    _flip_of(out, np.asarray(expected(images)))
    unit = out * np.asarray(STD) + np.asarray(MEAN)
    np.testing.assert_allclose(unit[..., 0], unit[..., 1], atol=1e-5)
    np.testing.assert_allclose(unit[..., 1], unit[..., 2], atol=1e-5)
    jittered = _view(images, "pretrain", dataclasses.replace(OFF, jitter_p=1.0), WHOLE, seed=(5,))
    base = _view(images, "pretrain", OFF, WHOLE, seed=(5,))
    assert all(not np.allclose(jittered[i], base[i], atol=1e-3) for i in range(len(base)))


def test_train_view_is_crop_flip_only():
    images = _images()
    _flip_of(_view(images, "train", BASE, WHOLE, seed=(7,)), _normalised(images))


def test_eval_view_is_centre_crop_then_resize():
    images = _images(size=16)
    out = _view(images, "eval", dataclasses.replace(BASE, image_size=14), pipeline.Recipe((1.0, 1.0), eval_crop=14))
    np.testing.assert_allclose(out, _normalised(images[:, 1:15, 1:15]), atol=1e-5)
    flat = np.full((2, 32, 32, 3), 77, np.uint8)  # CIFAR: crop 28 -> resize 32 keeps a flat image flat
    out = _view(flat, "eval", dataclasses.replace(BASE, image_size=32), pipeline.Recipe((1.0, 1.0), eval_crop=28))
    np.testing.assert_allclose(out, _normalised(flat), atol=1e-5)


@pytest.mark.parametrize("box,size", [((0, 0, 40, 30), 12), ((5, 7, 9, 13), 20), ((10, 0, 30, 30), 30),
                                      ((1, 2, 37, 5), 16)])
def test_resized_crop_equals_pil(box, size):
    """torchvision's resized_crop on a PIL image: crop, then PIL's bilinear resize (here in float)."""
    x = np.random.default_rng(14).random((40, 30, 3)).astype(np.float32)
    ours = np.asarray(augment.resized_crop(jnp.asarray(x), jnp.asarray(box, jnp.float32), size))
    top, left, h, w = box
    for c in range(3):
        theirs = Image.fromarray(x[..., c], mode="F").crop((left, top, left + w, top + h)).resize(
            (size, size), Image.BILINEAR)
        np.testing.assert_allclose(ours[..., c], np.asarray(theirs), atol=2e-5)


def test_the_crop_ignores_pixels_outside_the_box_and_the_canvas_padding():
    """The image is canvas[:10, :14] and the box rows 2..7, columns 3..10."""
    canvas = np.random.default_rng(15).integers(0, 256, (1, 12, 18, 3), dtype=np.uint8)
    batch = dict(pixels_a=canvas, frame_a=np.asarray([[10, 14, 0, 1]], np.float32),
                 boxes=np.asarray([[[2, 3, 6, 8]]], np.float32),
                 draws=np.full((1, 1, crops.VIEW_DRAWS), 0.01, np.float32))  # every colour op and blur on
    padding_changed, outside_box_changed = canvas.copy(), canvas.copy()
    padding_changed[:, 10:], padding_changed[:, :, 14:] = 0, 255
    outside_box_changed[:, :2], outside_box_changed[:, 8:], outside_box_changed[:, :, :3] = 0, 255, 0
    outside_box_changed[:, :, 11:] = 255
    params = dataclasses.replace(BASE, image_size=5, hflip_p=0.0)

    def view(kind, pixels):
        return np.asarray(_views(dict(batch, pixels_a=pixels), (("a", kind),), params))

    for kind in ("eval", "train", "pretrain"):
        np.testing.assert_array_equal(view(kind, canvas), view(kind, padding_changed), err_msg=kind)
    for kind in ("eval", "train"):  # a crop sees nothing outside its box
        np.testing.assert_array_equal(view(kind, canvas), view(kind, outside_box_changed), err_msg=kind)
    # colour first: contrast and blur see the whole image, as the original's colour ops before the crop
    assert not np.allclose(view("pretrain", canvas), view("pretrain", outside_box_changed))


def test_a_transposed_portrait_gives_the_upright_view():
    """A portrait is stored transposed in a landscape canvas; its views equal those of the upright image."""
    portrait = np.random.default_rng(16).integers(0, 256, (20, 12, 3), dtype=np.uint8)
    slot = np.empty((12, 20, 3), np.uint8)
    decoded = decode.place(slot, portrait)
    assert decoded.transposed and decoded.size == (20, 12)
    images = empty_images(1, (12, 20))
    images.pixels[0], images.size[0], images.raw_size[0], images.transposed[0] = slot, (20, 12), (20, 12), True
    upright = empty_images(1, (20, 20))
    upright.pixels[0, :, :12], upright.size[0], upright.raw_size[0], upright.transposed[0] = portrait, (20, 12), (20, 12), False
    u = np.random.default_rng(17).random((1, pipeline.VIEW_COLUMNS))
    params = dataclasses.replace(BASE, image_size=6, jitter_p=1.0, blur_p=1.0, grey_p=0.0)
    for kind in ("pretrain", "train", "eval"):
        outs = []
        for stored in (images, upright):
            box = pipeline.view_boxes(stored, kind, u[:, :crops.CROP_DRAWS], RECIPE)
            batch = dict(pixels_a=stored.pixels, frame_a=pipeline.frame(stored), boxes=box[:, None].astype(np.float32),
                         draws=u[:, None, crops.CROP_DRAWS:].astype(np.float32))
            outs.append(np.asarray(_views(batch, (("a", kind),), params)))
        np.testing.assert_allclose(outs[0], outs[1], atol=1e-5, err_msg=kind)


def test_blur_sigma_is_in_pixels_of_the_original_file():
    """An image stored at half its size is blurred with half the sigma (in stored pixels)."""
    x = jnp.asarray(np.random.default_rng(18).random((16, 16, 3)), jnp.float32)
    u = jnp.zeros(crops.PHOTOMETRIC_DRAWS).at[crops.JITTER_DRAWS].set(1.0).at[crops.JITTER_DRAWS + 1].set(1.0)
    u = u.at[crops.JITTER_DRAWS + 2].set(1.0)  # sigma = the top of the range
    params = dataclasses.replace(BASE, blur_sigma=(0.1, 2.0), blur_p=1.0)
    half = augment._photometric(u, x, jnp.asarray([16.0, 16.0]), 0.5, params)
    np.testing.assert_allclose(half, augment.gaussian_blur(x, 1.0, 6), atol=1e-6)


def test_flip_is_exact():
    x = jnp.asarray(_images(1)[0], jnp.float32)
    np.testing.assert_array_equal(augment.hflip(x, True), x[:, ::-1])
    np.testing.assert_array_equal(augment.hflip(x, False), x)


def test_hue_matches_colorsys():
    rgb = np.random.default_rng(10).random((50, 3)).astype(np.float32)
    shift = 0.13
    out = np.asarray(augment.adjust_hue(jnp.asarray(rgb), shift))
    expected = []
    for r, g, b in rgb:
        h, s, v = colorsys.rgb_to_hsv(r, g, b)
        expected.append(colorsys.hsv_to_rgb((h + shift) % 1.0, s, v))
    np.testing.assert_allclose(out, np.asarray(expected), atol=1e-5)


def test_hue_wrapping_is_jnp_mod_bit_for_bit():
    """wrap_unit and hsv_to_rgb's mod 6 replace jnp.mod (a scalar fmodf per element on XLA:CPU) by exact forms."""
    rng = np.random.default_rng(12)
    x = np.concatenate([rng.uniform(-3, 3, 100_000), rng.uniform(-1e-6, 1e-6, 1000), np.arange(-5.0, 6.0),
                        [np.nextafter(1, 0), np.nextafter(-1, 0), 0.999999, -0.999999]]).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(augment.wrap_unit(jnp.asarray(x))), np.asarray(jnp.mod(x, 1.0)))
    hsv = np.stack([rng.random(100_000), rng.random(100_000), rng.random(100_000)], -1).astype(np.float32)
    hsv[:4, 0] = [0.0, np.nextafter(1, 0), 1 / 6, 5 / 6]
    h, s, v = hsv[:, 0:1], hsv[:, 1:2], hsv[:, 2:3]
    k = jnp.mod(jnp.asarray([5.0, 3.0, 1.0]) + 6.0 * h, 6.0)
    np.testing.assert_array_equal(np.asarray(augment.hsv_to_rgb(jnp.asarray(hsv))),
                                  np.asarray(v - v * s * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)))
    assert " remainder(" not in jax.jit(augment.adjust_hue).lower(hsv, 0.3).compile().as_text()


def test_colour_ops_identity_at_neutral_factors():
    x = jnp.asarray(np.random.default_rng(11).random((5, 5, 3)), jnp.float32)
    for op, neutral in ((augment.adjust_brightness, 1.0), (augment.adjust_contrast, 1.0), (augment.adjust_saturation, 1.0), (augment.adjust_hue, 0.0)):
        np.testing.assert_allclose(op(x, neutral), x, atol=1e-5)


@pytest.mark.parametrize("size,valid", [(3, None), (20, None), (20, (13, 9))])
def test_blur_matches_padded_convolution(size, valid):
    radius = 6
    blur = jax.jit(augment.gaussian_blur, static_argnums=2)
    x = np.random.default_rng(13).random((size, size + 2, 3)).astype(np.float32)
    h, w = valid or x.shape[:2]
    for sigma in (0.1, 1.3, 2.0):
        weights = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
        weights /= weights.sum()
        p = np.pad(x[:h, :w], ((radius, radius), (0, 0), (0, 0)), mode="edge")
        y = sum(weights[t] * p[t : t + h] for t in range(2 * radius + 1))
        p = np.pad(y, ((0, 0), (radius, radius), (0, 0)), mode="edge")
        y = sum(weights[t] * p[:, t : t + w] for t in range(2 * radius + 1))
        out = blur(x, sigma, radius, None if valid is None else jnp.asarray(valid, jnp.float32))
        np.testing.assert_allclose(np.asarray(out)[:h, :w], y, atol=1e-5)


def _blur_by_gather(x, sigma, radius, valid):
    """The blur as indexing each tap at clip(i + t, 0, length - 1): the reference for the sliced taps."""
    weights = jnp.exp(-0.5 * (jnp.arange(-radius, radius + 1) / sigma) ** 2)
    weights = weights / jnp.sum(weights)
    for axis in (0, 1):
        positions = jnp.arange(x.shape[axis])
        out = jnp.zeros_like(x)
        for t in range(-radius, radius + 1):
            source = jnp.clip(positions + t, 0, jnp.maximum(valid[axis], 1).astype(positions.dtype) - 1)
            out = out + weights[t + radius] * jnp.take(x, source, axis=axis)
        x = out
    return x


def test_blur_taps_are_slices_with_the_gathers_values_bit_for_bit():
    """Sliced taps give the clipped-gather blur's values exactly (whole canvas, edges and padding included),
    and the compiled blur has no gather left (TPUs read 233 GB per step for them)."""
    rng = np.random.default_rng(17)
    n, h, w = 24, 23, 31
    x = rng.random((n, h, w, 3), dtype=np.float32)
    sigma = rng.uniform(0.1, 2.0, n).astype(np.float32)
    valid = np.stack([rng.integers(0, h + 1, n), rng.integers(0, w + 1, n)], 1).astype(np.float32)
    valid[:4] = [(h, w), (1, 1), (0, 0), (2, w)]
    sliced = jax.jit(jax.vmap(lambda x, s, v: augment.gaussian_blur(x, s, 6, v)))
    gathered = jax.jit(jax.vmap(lambda x, s, v: _blur_by_gather(x, s, 6, v)))
    np.testing.assert_array_equal(np.asarray(sliced(x, sigma, valid)), np.asarray(gathered(x, sigma, valid)))
    gathers = [f.lower(x, sigma, valid).compile().as_text().count(" gather(") for f in (sliced, gathered)]
    assert gathers[0] <= 2 < gathers[1], gathers  # the sliced form gathers only each axis's edge pixels


def test_from_config_and_validation():
    config = get_config()
    config.jitter_d, config.image_size, config.blur, config.crop_scale = 0.5, 96, True, (0.2, 1.0)
    params = startup.augment_params(config, MEAN, STD)
    assert params.jitter == (0.4, 0.4, 0.4, 0.1) and params.image_size == 96 and params.blur
    assert params.mean == MEAN and params.aug_order == "colour_first"
    assert startup.recipe(config) == pipeline.Recipe((0.2, 1.0), eval_crop=84)
    hash(params)
    with pytest.raises(ValueError, match="aug_order"):
        dataclasses.replace(params, aug_order="random")


def test_sharded_matches_unsharded():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    specs = (("a", "eval"), ("a", "pretrain"), ("a", "train"))
    batch = _batch(_images(16), specs, seed=(12,))
    sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
    out = _views(sharded, specs, BASE)
    assert out.sharding.spec[1] == "data" or out.sharding.spec[0] is None
    np.testing.assert_allclose(np.asarray(out), np.asarray(_views(batch, specs, BASE)), atol=1e-5)
