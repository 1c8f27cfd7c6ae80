"""On-device image augmentation (spec §4.3) in pure JAX.

The host ships uint8 batches; the random crops, colour ops and normalisation run jitted on the
accelerator, on the sharded batch. Every image gets its own key (`jax.random.split` + `vmap`), so
the result does not depend on how the batch is sharded.

Differences from the original's torchvision/PIL pipeline, all deliberate:

* Images are float32 in [0, 1] between ops; PIL rounds to uint8 after every op.
* Colour jitter applies brightness, contrast, saturation and hue in a random order drawn per image,
  like torchvision's ColorJitter (under `vmap` all four ops are computed at each of the 4 positions
  and the drawn one selected, so shapes stay static).
* Gaussian blur is an exact separable Gaussian (taps to 3 sigma_max, edge padding, sigma in pixels of
  the image it is applied to); PIL approximates the Gaussian with box blurs.
* The random resized crop resamples the crop box straight from the full image with
  `jax.image.scale_and_translate` (bilinear, antialiased when shrinking, like PIL), so pixels just
  outside the box can contribute to the border samples; PIL crops first.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp

from spcl_jax.errors import ConfigError

CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before its centre-crop fallback
EVAL_CROP_FRACTION = 0.875
GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL convert("L") and torchvision
AUG_ORDERS = ("colour_first", "crop_first")
# Each image draws one vector of uniforms (one threefry call: cheap to compile), sliced per op.
CROP_DRAWS = 2 * CROP_ATTEMPTS + 2  # areas, log-ratios, top, left
GEOMETRY_DRAWS = CROP_DRAWS + 1  # + flip
JITTER_DRAWS = 8  # order (argsort of 4), brightness, contrast, saturation, hue
PHOTOMETRIC_DRAWS = JITTER_DRAWS + 4  # + jitter coin, grey coin, blur sigma, blur coin


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """Static augmentation settings; frozen and hashable so jitted functions can take it as static."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = CROP_RATIO
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
            raise ConfigError(f"aug_order={self.aug_order!r} is not one of {AUG_ORDERS}: pass --config.aug_order=colour_first")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"crop_scale={self.crop_scale} must satisfy 0 < low <= high <= 1: pass e.g. --config.crop_scale='(0.08, 1.0)'")

    @classmethod
    def from_config(cls, config, mean, std):
        """The dataset's recipe from the config (spec §4.3): jitter strengths (0.8d, 0.8d, 0.8d, 0.2d)."""
        d = float(config.jitter_d)
        return cls(
            image_size=int(config.image_size),
            mean=tuple(float(m) for m in mean),
            std=tuple(float(s) for s in std),
            crop_scale=tuple(float(s) for s in config.crop_scale),
            jitter=(0.8 * d, 0.8 * d, 0.8 * d, 0.2 * d),
            jitter_p=float(config.jitter_p),
            grey_p=float(config.grey_p),
            blur=bool(config.blur),
            blur_p=float(config.blur_p),
            blur_sigma=tuple(float(s) for s in config.blur_sigma),
            aug_order=str(config.aug_order),
            hflip_p=float(config.hflip_p),
        )


# ---------------------------------------------------------------- pixel ops on one (H, W, 3) image in [0, 1]


def to_unit(images):
    """uint8 (or float in [0, 255]) pixels to float32 in [0, 1]."""
    return images.astype(jnp.float32) / 255.0


def normalise(x, mean, std):
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def luma(x):
    """(H, W) grey level of an RGB image."""
    return x @ jnp.asarray(GREY_WEIGHTS, jnp.float32)


def grayscale(x):
    return jnp.repeat(luma(x)[..., None], 3, axis=-1)


def adjust_brightness(x, factor):
    return jnp.clip(x * factor, 0.0, 1.0)


def adjust_contrast(x, factor):
    """Blend with the mean grey level of the whole image, as torchvision."""
    return jnp.clip(factor * x + (1.0 - factor) * jnp.mean(luma(x)), 0.0, 1.0)


def adjust_saturation(x, factor):
    return jnp.clip(factor * x + (1.0 - factor) * luma(x)[..., None], 0.0, 1.0)


def rgb_to_hsv(x):
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    maxc = jnp.max(x, axis=-1)
    minc = jnp.min(x, axis=-1)
    grey = maxc == minc
    chroma = maxc - minc
    s = chroma / jnp.where(grey, 1.0, maxc)
    div = jnp.where(grey, 1.0, chroma)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    h = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = jnp.mod(h / 6.0 + 1.0, 1.0)
    return jnp.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(x):
    """Closed form: channel n in (5, 3, 1) is v - v s clip(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6."""
    h, s, v = x[..., 0:1], x[..., 1:2], x[..., 2:3]
    k = jnp.mod(jnp.asarray([5.0, 3.0, 1.0]) + 6.0 * h, 6.0)
    return v - v * s * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def adjust_hue(x, shift):
    """Rotate the hue by `shift` turns (torchvision's hue_factor)."""
    hsv = rgb_to_hsv(x)
    return hsv_to_rgb(hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + shift, 1.0)))


def color_jitter(u, x, strengths):
    """torchvision ColorJitter from JITTER_DRAWS uniforms: one factor per op, the ops in a random order."""
    b, c, s, h = strengths
    order = jnp.argsort(u[:4])
    fb = max(0.0, 1.0 - b) + u[4] * (1.0 + b - max(0.0, 1.0 - b))
    fc = max(0.0, 1.0 - c) + u[5] * (1.0 + c - max(0.0, 1.0 - c))
    fs = max(0.0, 1.0 - s) + u[6] * (1.0 + s - max(0.0, 1.0 - s))
    fh = h * (2.0 * u[7] - 1.0)
    ops = (
        lambda y: adjust_brightness(y, fb),
        lambda y: adjust_contrast(y, fc),
        lambda y: adjust_saturation(y, fs),
        lambda y: adjust_hue(y, fh),
    )
    return jax.lax.fori_loop(0, 4, lambda i, y: jax.lax.switch(order[i], ops, y), x)


def blur_matrix(n, sigma, radius):
    """(n, n) matrix of a 1-D Gaussian blur (taps -radius..radius) with edge padding.

    Taps that fall off either end land on the edge pixel, so each row sums to 1.
    """
    w = jnp.exp(-0.5 * (jnp.arange(-radius, radius + 1) / sigma) ** 2)
    w = w / jnp.sum(w)
    cum = jnp.cumsum(w)
    i = jnp.arange(n)
    d = i[None, :] - i[:, None]
    m = jnp.where(jnp.abs(d) <= radius, w[jnp.clip(d + radius, 0, 2 * radius)], 0.0)
    low = jnp.where(i < radius, cum[jnp.clip(radius - i - 1, 0, 2 * radius)], 0.0)
    high = jnp.where(n - 1 - i < radius, 1.0 - cum[jnp.clip(n - i + radius - 1, 0, 2 * radius)], 0.0)
    return m.at[:, 0].add(low).at[:, n - 1].add(high)


def gaussian_blur(x, sigma, radius):
    """Separable Gaussian blur of an (H, W, C) image, as two small matmuls (traced sigma, static radius)."""
    rows = blur_matrix(x.shape[0], sigma, radius)
    cols = blur_matrix(x.shape[1], sigma, radius)
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("ij,jwc->iwc", rows, x, precision=hi)
    return jnp.einsum("vw,iwc->ivc", cols, x, precision=hi)


def sample_crop_box(u, height, width, scale, ratio=CROP_RATIO):
    """torchvision RandomResizedCrop.get_params from CROP_DRAWS uniforms: (top, left, h, w) int32 scalars.

    Draws CROP_ATTEMPTS boxes with area fraction ~ U(scale) and log-uniform aspect ratio, keeps the
    first that fits, else falls back to the largest centred box with the ratio clamped to `ratio`.
    """
    area_u, ratio_u, top_u, left_u = u[:CROP_ATTEMPTS], u[CROP_ATTEMPTS : 2 * CROP_ATTEMPTS], u[-2], u[-1]
    target = height * width * (scale[0] + area_u * (scale[1] - scale[0]))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = jnp.exp(log_lo + ratio_u * (log_hi - log_lo))
    ws = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
    hs = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
    fits = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
    first = jnp.argmax(fits)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fallback_h, fallback_w = int(round(width / ratio[0])), width
    elif in_ratio > ratio[1]:
        fallback_h, fallback_w = height, int(round(height * ratio[1]))
    else:
        fallback_h, fallback_w = height, width
    found = jnp.any(fits)
    h = jnp.where(found, hs[first], fallback_h)
    w = jnp.where(found, ws[first], fallback_w)
    top = jnp.where(found, jnp.minimum(jnp.floor(top_u * (height - h + 1)).astype(jnp.int32), height - h), (height - h) // 2)
    left = jnp.where(found, jnp.minimum(jnp.floor(left_u * (width - w + 1)).astype(jnp.int32), width - w), (width - w) // 2)
    return top, left, h, w


def resized_crop(x, box, size):
    """Bilinear resample of the box (top, left, h, w) to (size, size)."""
    top, left, h, w = (v.astype(jnp.float32) for v in box)
    scale = jnp.stack([size / h, size / w])
    translation = jnp.stack([-top * size / h, -left * size / w])
    return jax.image.scale_and_translate(x, (size, size, x.shape[-1]), (0, 1), scale, translation, method="linear", antialias=True)


def hflip(x, flip):
    return jnp.where(flip, x[:, ::-1], x)


# ---------------------------------------------------------------- one image


def _crop_flip(u, x, params):
    box = sample_crop_box(u[:CROP_DRAWS], x.shape[0], x.shape[1], params.crop_scale, params.crop_ratio)
    return hflip(resized_crop(x, box, params.image_size), u[CROP_DRAWS] < params.hflip_p)


def _photometric(u, x, params):
    jitter_u, (jitter_p, grey_p, sigma_u, blur_p) = u[:JITTER_DRAWS], u[JITTER_DRAWS:]
    x = jnp.where(jitter_p < params.jitter_p, color_jitter(jitter_u, x, params.jitter), x)
    x = jnp.where(grey_p < params.grey_p, grayscale(x), x)
    if params.blur:
        lo, hi = params.blur_sigma
        blurred = gaussian_blur(x, lo + sigma_u * (hi - lo), math.ceil(3.0 * hi))
        x = jnp.where(blur_p < params.blur_p, blurred, x)
    return x


def _pretrain_one(key, image, params):
    u = jax.random.uniform(key, (GEOMETRY_DRAWS + PHOTOMETRIC_DRAWS,))
    geometry, photometric = u[:GEOMETRY_DRAWS], u[GEOMETRY_DRAWS:]
    x = to_unit(image)
    if params.aug_order == "colour_first":
        x = _crop_flip(geometry, _photometric(photometric, x, params), params)
    else:
        x = _photometric(photometric, _crop_flip(geometry, x, params), params)
    return normalise(x, params.mean, params.std)


def _train_one(key, image, params):
    u = jax.random.uniform(key, (GEOMETRY_DRAWS,))
    return normalise(_crop_flip(u, to_unit(image), params), params.mean, params.std)


# ---------------------------------------------------------------- batches


def pretrain_view(key, images, params):
    """One augmented pretraining view of a batch: uint8 (n, H, W, 3) -> normalised float32 (n, S, S, 3).

    colour_first (the original): jitter(p) -> grey(p) -> blur(p, only if params.blur) -> RRC -> flip;
    crop_first (SimCLR): RRC -> flip -> jitter -> grey -> blur. Call twice with different keys for two views.
    """
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(_pretrain_one, in_axes=(0, 0, None))(keys, images, params)


def train_view(key, images, params):
    """Linear-evaluation training view: RRC(crop_scale) -> flip -> normalise, no colour ops."""
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(_train_one, in_axes=(0, 0, None))(keys, images, params)


def eval_view(images, params):
    """Deterministic view: centre crop int(0.875 H) (torchvision offsets) -> bilinear resize to S -> normalise.

    With images stored at load size S/0.875 (ImageNet-size folders) this is the usual resize-256/crop-224;
    with images stored at S (CIFAR) it is the original's CenterCrop(28) -> Resize(32).
    """
    n, height, width, channels = images.shape
    ch, cw = int(EVAL_CROP_FRACTION * height), int(EVAL_CROP_FRACTION * width)
    top, left = int(round((height - ch) / 2.0)), int(round((width - cw) / 2.0))
    x = to_unit(images[:, top : top + ch, left : left + cw])
    size = params.image_size
    x = jax.image.resize(x, (n, size, size, channels), method="linear", antialias=True)
    return normalise(x, params.mean, params.std)
