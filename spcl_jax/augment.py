"""On-device image augmentation (DIFFERENCES.md, augmentation recipes and D-7 to D-11) in pure JAX, from host-drawn boxes and uniforms.

The host (`spcl_jax.data.pipeline`) ships each image whole in a canvas (`spcl_jax.data.decode`) with
its `frame`, and per view a crop box and a vector of uniforms (`spcl_jax.data.crops`); everything
here is a deterministic function of them, jitted on the sharded batch, so a view does not depend on
how the batch is sharded. Recipes, in the original's order:

* pretrain (colour_first, the original): colour jitter (p) -> grey (p) -> blur (p, if enabled) on the
  whole image, then the crop box resized to S -> flip; crop_first (SimCLR): crop -> flip -> colours.
* train (linear evaluation, original protocol): crop box resized to S -> flip.
* eval: the centre box resized to S (CenterCrop(0.875 S) -> Resize(S) on the original file).

The crop is resampled like PIL's bilinear `resize` of the cropped image (what torchvision's
RandomResizedCrop does): a triangle filter widened by the scale factor when shrinking, over the
box's pixels only. Deliberate differences from the torchvision/PIL pipeline:

* Images are float32 in [0, 1] between ops; PIL rounds to uint8 after every op.
* Colour jitter applies brightness, contrast, saturation and hue in a random order drawn per image,
  like torchvision's ColorJitter (all four ops are computed at each of the 4 positions and the drawn
  one selected, so shapes stay static).
* Gaussian blur is an exact Gaussian (taps to 3 sigma_max, edge padding, sigma in pixels of the
  original file); PIL approximates it with box blurs.
"""
import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from spcl_jax.data.crops import FLIP_DRAW, JITTER_DRAWS

GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL convert("L") and torchvision
AUG_ORDERS = ("colour_first", "crop_first")
VIEW_KINDS = ("pretrain", "train", "eval")
# The frame of an image in its canvas, float32 (4,): valid height and width in the canvas (after any
# transposition), 1 if the canvas holds it transposed, and stored/original size (blur sigmas are in
# pixels of the original file).
FRAME_HEIGHT, FRAME_WIDTH, FRAME_TRANSPOSED, FRAME_SCALE = range(4)
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """Static device-side augmentation settings; frozen and hashable so jitted functions can take them."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grey_p: float = 0.2
    blur: bool = False
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    aug_order: str = "colour_first"
    hflip_p: float = 0.5

    def __post_init__(self):
        if self.aug_order not in AUG_ORDERS:
            raise ValueError(f"aug_order {self.aug_order!r} is not one of {AUG_ORDERS}")


# ---------------------------------------------------------------- pixel ops on one (H, W, 3) image in [0, 1]


def to_unit(images: jax.Array) -> jax.Array:
    """uint8 (or float in [0, 255]) pixels to float32 in [0, 1]."""
    return images.astype(jnp.float32) / 255.0


def normalise(x: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def luma(x: jax.Array) -> jax.Array:
    """(H, W) grey level of an RGB image."""
    return x @ jnp.asarray(GREY_WEIGHTS, jnp.float32)


def grayscale(x: jax.Array) -> jax.Array:
    return jnp.repeat(luma(x)[..., None], 3, axis=-1)


def adjust_brightness(x: jax.Array, factor: ArrayLike) -> jax.Array:
    return jnp.clip(x * factor, 0.0, 1.0)


def adjust_contrast(x: jax.Array, factor: ArrayLike, grey_mean: ArrayLike | None = None) -> jax.Array:
    """Blend with the mean grey level of the whole image (given, or over all of x), as torchvision."""
    grey_mean = jnp.mean(luma(x)) if grey_mean is None else grey_mean
    return jnp.clip(factor * x + (1.0 - factor) * grey_mean, 0.0, 1.0)


def adjust_saturation(x: jax.Array, factor: ArrayLike) -> jax.Array:
    return jnp.clip(factor * x + (1.0 - factor) * luma(x)[..., None], 0.0, 1.0)


def wrap_unit(x: jax.Array) -> jax.Array:
    """x mod 1 as x - floor(x): bit for bit jnp.mod(x, 1.0) (a float's fractional part is exact, and both round
    x + n once), without the scalar fmodf call per element that XLA:CPU makes for jnp.mod (2% of the digits step)."""
    return x - jnp.floor(x)


def rgb_to_hsv(x: jax.Array) -> jax.Array:
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    maxc = jnp.max(x, axis=-1)
    minc = jnp.min(x, axis=-1)
    grey = maxc == minc
    chroma = maxc - minc
    s = chroma / jnp.where(grey, 1.0, maxc)
    div = jnp.where(grey, 1.0, chroma)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    h = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = wrap_unit(h / 6.0 + 1.0)
    return jnp.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(x: jax.Array) -> jax.Array:
    """Closed form: channel n in (5, 3, 1) is v - v s clip(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6, for hues h in
    [0, 1) (as rgb_to_hsv gives), where n + 6h < 12 and the mod is one exact subtraction."""
    h, s, v = x[..., 0:1], x[..., 1:2], x[..., 2:3]
    k = jnp.asarray([5.0, 3.0, 1.0]) + 6.0 * h
    k = jnp.where(k >= 6.0, k - 6.0, k)
    return v - v * s * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def adjust_hue(x: jax.Array, shift: ArrayLike) -> jax.Array:
    """Rotate the hue by `shift` turns (torchvision's hue_factor)."""
    hsv = rgb_to_hsv(x)
    return hsv_to_rgb(hsv.at[..., 0].set(wrap_unit(hsv[..., 0] + shift)))


def color_jitter(u: jax.Array, x: jax.Array, strengths: tuple[float, float, float, float],
                 valid: jax.Array) -> jax.Array:
    """torchvision ColorJitter from JITTER_DRAWS uniforms: one factor per op, the ops in a random order.

    `valid` = (h, w): the image is x[:h, :w] (the rest is canvas padding, left out of the contrast mean).
    """
    b, c, s, h = strengths
    order = jnp.argsort(u[:4])
    fb = max(0.0, 1.0 - b) + u[4] * (1.0 + b - max(0.0, 1.0 - b))
    fc = max(0.0, 1.0 - c) + u[5] * (1.0 + c - max(0.0, 1.0 - c))
    fs = max(0.0, 1.0 - s) + u[6] * (1.0 + s - max(0.0, 1.0 - s))
    fh = h * (2.0 * u[7] - 1.0)
    ops = (
        lambda y: adjust_brightness(y, fb),
        lambda y: adjust_contrast(y, fc, masked_mean(luma(y), valid)),
        lambda y: adjust_saturation(y, fs),
        lambda y: adjust_hue(y, fh),
    )
    return jax.lax.fori_loop(0, 4, lambda i, y: jax.lax.switch(order[i], ops, y), x)


def masked_mean(grey: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean of grey[:h, :w] for a traced `valid` = (h, w)."""
    inside = (jnp.arange(grey.shape[0])[:, None] < valid[0]) & (jnp.arange(grey.shape[1])[None, :] < valid[1])
    return jnp.sum(jnp.where(inside, grey, 0.0)) / jnp.maximum(valid[0] * valid[1], 1.0)


def _blur_axis(x, axis, weights, length):
    """1-D blur along `axis` with taps -r..r; samples beyond [0, length) take the edge pixel.

    Each tap is a static slice of x edge-padded by r, with the samples past the traced `length` replaced by
    the last valid pixel: the same sums, tap after tap, as indexing x at clip(i + t, 0, length - 1), without
    a gather. As gathers, the taps of a 224 px ImageNet step read 233 GB per TPU v5e chip and held 0.6 GiB of
    its temporaries per 32 images (XLA's cost and memory analysis; BENCHMARKS.md, planning).
    """
    radius = (weights.shape[0] - 1) // 2
    size = x.shape[axis]
    last = jnp.clip(jnp.maximum(length, 1).astype(jnp.int32) - 1, 0, size - 1)
    edge = jax.lax.dynamic_index_in_dim(x, last, axis, keepdims=True)
    padding = [(0, 0)] * x.ndim
    padding[axis] = (radius, radius)
    padded = jnp.pad(x, padding, mode="edge")
    positions = jnp.arange(size).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
    out = jnp.zeros_like(x)
    for t in range(-radius, radius + 1):  # unrolled: one fused slice-and-add per tap
        shifted = jax.lax.slice_in_dim(padded, radius + t, radius + t + size, axis=axis)
        out = out + weights[t + radius] * jnp.where(positions + t > last, edge, shifted)
    return out


def gaussian_blur(x: jax.Array, sigma: ArrayLike, radius: int, valid: jax.Array | None = None) -> jax.Array:
    """Separable Gaussian blur of the image x[:h, :w] (valid = (h, w), default all of x), traced sigma,
    static radius, edge padding."""
    valid = x.shape[:2] if valid is None else valid
    weights = jnp.exp(-0.5 * (jnp.arange(-radius, radius + 1) / sigma) ** 2)
    weights = weights / jnp.sum(weights)
    return _blur_axis(_blur_axis(x, 0, weights, valid[0]), 1, weights, valid[1])


def resample_weights(start: ArrayLike, length: ArrayLike, out_size: int, in_size: int) -> jax.Array:
    """(out_size, in_size) weights of PIL's bilinear resize of pixels [start, start + length) to out_size.

    Output pixel i samples at start + (i + 0.5) * scale with a triangle filter whose support widens
    with scale = length / out_size when shrinking (antialiasing); input pixels whose centre lies
    outside the box get no weight, and each row sums to 1. `start`, `length` may be traced floats.
    """
    scale = length / out_size
    centre = start + (jnp.arange(out_size) + 0.5) * scale
    pixel = jnp.arange(in_size) + 0.5
    w = jnp.maximum(0.0, 1.0 - jnp.abs(pixel[None, :] - centre[:, None]) / jnp.maximum(scale, 1.0))
    w = jnp.where((pixel >= start) & (pixel <= start + length), w, 0.0)
    return w / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1e-12)


def resized_crop(x: jax.Array, box: jax.Array, size: int) -> jax.Array:
    """The box (top, left, h, w) of x (H, W, C) resampled to (size, size, C)."""
    rows = resample_weights(box[0], box[2], size, x.shape[0])
    cols = resample_weights(box[1], box[3], size, x.shape[1])
    x = jnp.einsum("sh,hwc->swc", rows, x, precision=_HIGHEST)
    return jnp.einsum("tw,swc->stc", cols, x, precision=_HIGHEST)


def hflip(x: jax.Array, flip: ArrayLike) -> jax.Array:
    return jnp.where(flip, x[:, ::-1], x)


# ---------------------------------------------------------------- one image


def _photometric(u, x, valid, sigma_scale, params):
    """Jitter -> grey -> blur of x[:h, :w] from PHOTOMETRIC_DRAWS uniforms; blur sigmas are scaled by sigma_scale."""
    jitter_u, (jitter_p, grey_p, sigma_u, blur_p) = u[:JITTER_DRAWS], u[JITTER_DRAWS:]
    x = jnp.where(jitter_p < params.jitter_p, color_jitter(jitter_u, x, params.jitter, valid), x)
    x = jnp.where(grey_p < params.grey_p, grayscale(x), x)
    if params.blur:
        lo, hi = params.blur_sigma
        blurred = gaussian_blur(x, (lo + sigma_u * (hi - lo)) * sigma_scale, math.ceil(3.0 * hi), valid)
        x = jnp.where(blur_p < params.blur_p, blurred, x)
    return x


def view(pixels: jax.Array, frame: jax.Array, box: jax.Array, u: jax.Array, params: AugmentParams,
         kind: str) -> jax.Array:
    """One normalised (S, S, 3) view of the image in `pixels` (a uint8 canvas) described by `frame`.

    `box` (top, left, h, w) is in canvas pixels; `u` holds the view's VIEW_DRAWS uniforms (unused by
    "eval"). kind: "pretrain" | "train" | "eval" (see the module docstring).
    """
    size = params.image_size
    x = to_unit(pixels)
    valid = frame[FRAME_HEIGHT:FRAME_WIDTH + 1]
    photometric = u[FLIP_DRAW + 1:]
    if kind == "pretrain" and params.aug_order == "colour_first":
        x = _photometric(photometric, x, valid, frame[FRAME_SCALE], params)
    y = resized_crop(x, box, size)
    y = jnp.where(frame[FRAME_TRANSPOSED] > 0, y.transpose(1, 0, 2), y)
    if kind != "eval":
        y = hflip(y, u[FLIP_DRAW] < params.hflip_p)
    if kind == "pretrain" and params.aug_order == "crop_first":
        y = _photometric(photometric, y, jnp.asarray([size, size], jnp.float32), 1.0, params)
    return normalise(y, params.mean, params.std)


# ---------------------------------------------------------------- batches


def views(batch: Mapping[str, jax.Array], specs: Sequence[tuple[str, str]], params: AugmentParams) -> jax.Array:
    """(V, n, S, S, 3) views of a host batch (`spcl_jax.data.pipeline`): view v of every image of set
    specs[v][0] ("a" or "b") with recipe specs[v][1]. Views of one recipe are computed in one vmap."""
    out = [None] * len(specs)
    for kind in VIEW_KINDS:
        chosen = [v for v, (_, k) in enumerate(specs) if k == kind]
        if not chosen:
            continue
        pixels = jnp.stack([batch[f"pixels_{specs[v][0]}"] for v in chosen])
        frames = jnp.stack([batch[f"frame_{specs[v][0]}"] for v in chosen])
        boxes = jnp.moveaxis(batch["boxes"][:, jnp.asarray(chosen)], 1, 0)
        draws = jnp.moveaxis(batch["draws"][:, jnp.asarray(chosen)], 1, 0)
        one = functools.partial(view, params=params, kind=kind)
        made = jax.vmap(jax.vmap(one))(pixels, frames, boxes, draws)
        for i, v in enumerate(chosen):
            out[v] = made[i]
    return jnp.stack(out)
