"""The original's `visual_cls` figure without matplotlib: a 2-D projection of the features, one colour
per pseudo label, drawn with PIL (written as a PNG and sent to TensorBoard)."""
import colorsys

import numpy as np
from PIL import Image, ImageDraw


def scatter(points, labels, size=512, radius=2):
    """(n, 2) points coloured by integer label -> (size, size, 3) uint8 image."""
    points = np.asarray(points, np.float64)
    lo, hi = points.min(0), points.max(0)
    xy = (points - lo) / np.maximum(hi - lo, 1e-12) * (size - 4 * radius) + 2 * radius
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    golden = 0.6180339887
    for (x, y), label in zip(xy, np.asarray(labels)):
        r, g, b = colorsys.hsv_to_rgb((int(label) * golden) % 1.0, 0.75, 0.85)
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=(int(r * 255), int(g * 255), int(b * 255)))
    return np.asarray(image)


def save_png(image, path):
    Image.fromarray(image).save(path)
