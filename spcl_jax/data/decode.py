"""Decoding images on the host into fixed-size canvases, whole: the crops are cut later, on the device.

A decoded image keeps its whole field of view. It is scaled down (never up) so that its shorter side
is at most the canvas height and its longer side at most the canvas width, then written top-left
into a landscape canvas of shape (L, ceil(1.5 L)) - transposed when it is a portrait, so portraits
and landscapes share one canvas. `Decoded` records what the device needs to undo that: the stored
size (upright), the original file's size and whether the canvas holds it transposed.

JPEGs are decoded with simplejpeg (libjpeg-turbo without PIL's per-image overhead: 0.31 ms against
PIL's 0.46 ms for a 341x256 JPEG here, BENCHMARKS.md), with DCT-domain downscaling when the image is
at least twice as big as needed. Other formats, and JPEGs simplejpeg refuses
(CMYK), go through PIL.
"""
import io
import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image

CANVAS_ASPECT = 1.5  # canvas width / height: holds 4:3 and 3:2 photos at full height


class DecodeError(Exception):
    """The bytes are not an image PIL or simplejpeg can decode."""


class Decoded(NamedTuple):
    """Where one decoded image sits in its canvas slot."""

    size: tuple  # (h, w) stored, upright
    raw_size: tuple  # (h, w) of the file before any scaling, upright
    transposed: bool  # the canvas holds the image transposed (a portrait stored as a landscape)


def canvas_shape(load_size: int) -> tuple[int, int]:
    """(height, width) of the canvas for images whose shorter side is capped at `load_size`."""
    return int(load_size), int(math.ceil(load_size * CANVAS_ASPECT))


def fitted_size(height: int, width: int, canvas: Sequence[int]) -> tuple[int, int]:
    """Upright (h, w) after scaling down to fit a canvas in whichever orientation holds it whole."""
    scale = min(1.0, canvas[0] / min(height, width), canvas[1] / max(height, width))
    if scale >= 1.0:
        return int(height), int(width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def place(slot: np.ndarray, image: np.ndarray, raw_size: Sequence[int] | None = None,
          transposed: bool = False) -> Decoded:
    """Writes uint8 `image` (h, w, 3) top-left into `slot` (the canvas, landscape), transposing a
    portrait, and zeroes the rest of the slot. `transposed` says `image` is already transposed
    (prepared records store portraits that way). Returns its `Decoded`."""
    if image.shape[0] > image.shape[1] and not transposed:
        image, transposed = image.transpose(1, 0, 2), True
    h, w = image.shape[:2]
    if h > slot.shape[0] or w > slot.shape[1]:
        raise ValueError(f"image {h}x{w} does not fit the canvas {slot.shape[0]}x{slot.shape[1]}")
    slot[:h, :w] = image
    slot[h:] = 0
    slot[:h, w:] = 0
    size = (w, h) if transposed else (h, w)
    return Decoded(size, tuple(raw_size) if raw_size is not None else size, transposed)


def _resize(image, height, width):
    """Antialiased bilinear resize (PIL's, as torchvision's Resize on PIL images)."""
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def too_many_pixels(height: int, width: int) -> str | None:
    """Why an image this big is refused (over PIL's decompression-bomb limit `Image.MAX_IMAGE_PIXELS`, where PIL
    starts to warn), else None: one limit for every format and for the header scan of image folders."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and height * width > limit:
        return f"{width}x{height} pixels exceed PIL's decompression-bomb limit of {limit} pixels"
    return None


def _decode_jpeg(data, canvas):
    """(pixels, raw (h, w)) with simplejpeg, or None when it cannot decode these bytes."""
    import simplejpeg

    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        too_big = too_many_pixels(height, width)
        if too_big:
            raise DecodeError(too_big)
        fit = fitted_size(height, width, canvas)
        # The smallest DCT-domain reduction by at least 2 that still covers the fitted size, else none:
        # libjpeg-turbo's reductions by less than 2 decode slower than no reduction (BENCHMARKS.md).
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_factor=2, min_height=fit[0], min_width=fit[1])
    except ValueError:
        return None
    return pixels, (height, width)


def _decode_pil(data):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                raw = (image.height, image.width)
                return np.asarray(image.convert("RGB")), raw
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise DecodeError(str(e) or type(e).__name__) from e


def decode_into(slot: np.ndarray, data: bytes, raw_size: Sequence[int] | None = None,
                transposed: bool = False) -> Decoded:
    """Decodes image bytes into the canvas `slot` (Hc, Wc, 3), scaled down to fit; returns `Decoded`.

    `raw_size` and `transposed` describe bytes that were already prepared (see `spcl_jax.data.records`):
    the original file's upright size, and whether the bytes hold the image transposed.
    """
    canvas = slot.shape[:2]
    decoded = _decode_jpeg(data, canvas) if data[:2] == b"\xff\xd8" else None
    pixels, raw = decoded if decoded is not None else _decode_pil(data)
    h, w = pixels.shape[:2]
    fit_h, fit_w = fitted_size(h, w, canvas)
    if (fit_h, fit_w) != (h, w):
        pixels = _resize(pixels, fit_h, fit_w)
    upright_raw = raw[::-1] if transposed else raw
    return place(slot, pixels, raw_size if raw_size is not None else upright_raw, transposed)
