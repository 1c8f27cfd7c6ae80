"""Figures of a run drawn with PIL (no matplotlib): the original's `visual_cls` figure, the first two
whitened components of the features coloured by pseudo label and, when the data has labels, beside it by
ground truth; and `figs/losses.png`, every loss term and the learning rate against the step. Each panel
has axes with ticks and labels, a title and a legend; PNGs are written atomically."""
import colorsys
import io
import itertools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from spcl_jax.storage import write_atomic

PLOT = 384  # side of a panel's square plot area, in pixels
LEFT, TOP, BOTTOM, LEGEND = 76, 40, 56, 176  # margins around it: tick labels and axis label, title, legend
PANEL_WIDTH, PANEL_HEIGHT = LEFT + PLOT + LEGEND, TOP + PLOT + BOTTOM
LEGEND_ENTRIES = 10  # labels listed by name; beyond, the most frequent ones
UNLABELLED = (190, 190, 190)
SERIES_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))
INK, GRID = (0, 0, 0), (228, 228, 228)


def _font(size):
    return ImageFont.load_default(size=size)


def label_colour(label: int | np.integer) -> tuple[int, int, int]:
    """A distinct colour per integer label: hues a golden-ratio turn apart."""
    r, g, b = colorsys.hsv_to_rgb((int(label) * 0.6180339887) % 1.0, 0.75, 0.85)
    return int(r * 255), int(g * 255), int(b * 255)


def ticks(lo: float, hi: float, count: int = 5) -> list[tuple[float, str]]:
    """About `count` round values (1, 2 or 5 times a power of ten apart) within [lo, hi]."""
    raw = (hi - lo) / count
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))
    first = math.ceil(lo / step - 1e-9)
    values = [(first + i) * step for i in range(int(math.floor(hi / step + 1e-9)) - first + 1)]
    decimals = max(0, -math.floor(math.log10(step)))
    return [(v, f"{v:.1e}" if decimals > 4 else f"{v:.{decimals}f}") for v in values]


def _limits(values, pad=0.04):
    """(lo, hi) around finite `values`, padded, never empty."""
    values = np.asarray(values, np.float64)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    span = hi - lo if hi > lo else max(abs(hi), 1.0)
    return lo - pad * span, hi + pad * span


class _Panel:
    """One panel: a white PANEL_WIDTH x PANEL_HEIGHT image with axes over the data limits `xlim`, `ylim`."""

    def __init__(self, title: str, xlabel: str, ylabel: str, xlim: tuple[float, float],
                 ylim: tuple[float, float]):
        self.image = Image.new("RGB", (PANEL_WIDTH, PANEL_HEIGHT), "white")
        self.draw = ImageDraw.Draw(self.image)
        self.xlim, self.ylim = xlim, ylim
        self.legend_y = TOP
        small = _font(12)
        for value, text in ticks(*ylim):
            y = self.y(value)
            self.draw.line((LEFT, y, LEFT + PLOT, y), fill=GRID)
            self.draw.line((LEFT - 5, y, LEFT, y), fill=INK)
            self.draw.text((LEFT - 8, y), text, fill=INK, font=small, anchor="rm")
        for value, text in ticks(*xlim):
            x = self.x(value)
            self.draw.line((x, TOP, x, TOP + PLOT), fill=GRID)
            self.draw.line((x, TOP + PLOT, x, TOP + PLOT + 5), fill=INK)
            self.draw.text((x, TOP + PLOT + 8), text, fill=INK, font=small, anchor="mt")
        self.draw.rectangle((LEFT, TOP, LEFT + PLOT, TOP + PLOT), outline=INK)
        self.draw.text((LEFT + PLOT / 2, TOP / 2), title, fill=INK, font=_font(16), anchor="mm")
        self.draw.text((LEFT + PLOT / 2, PANEL_HEIGHT - 8), xlabel, fill=INK, font=_font(13), anchor="md")
        ylabel_image = Image.new("RGB", (PLOT, 18), "white")
        ImageDraw.Draw(ylabel_image).text((PLOT / 2, 9), ylabel, fill=INK, font=_font(13), anchor="mm")
        self.image.paste(ylabel_image.rotate(90, expand=True), (4, TOP))

    def x(self, value: float) -> float:
        return LEFT + (value - self.xlim[0]) / (self.xlim[1] - self.xlim[0]) * PLOT

    def y(self, value: float) -> float:
        return TOP + PLOT - (value - self.ylim[0]) / (self.ylim[1] - self.ylim[0]) * PLOT

    def legend(self, colour: tuple[int, int, int] | None, text: str, line: bool = False) -> None:
        """One legend line: a swatch of `colour` (a line segment if `line`; none for None) and `text`."""
        x, y = LEFT + PLOT + 14, self.legend_y
        if line:
            self.draw.line((x, y + 7, x + 14, y + 7), fill=colour, width=3)
        elif colour is not None:
            self.draw.rectangle((x + 2, y + 2, x + 12, y + 12), fill=colour)
        self.draw.text((x + 20, y + 7), text, fill=INK, font=_font(12), anchor="lm")
        self.legend_y += 18


def _scatter_panel(points, labels, title, name, names, radius=2):
    """Points coloured by label (grey where the label is < 0, unlabelled), the most frequent labels listed
    as `name` k (count) under a line counting the `names`."""
    panel = _Panel(title, "first whitened component", "second whitened component",
                   _limits(points[:, 0]), _limits(points[:, 1]))
    for (x, y), label in zip(points, labels):
        x, y = panel.x(x), panel.y(y)
        colour = label_colour(label) if label >= 0 else UNLABELLED
        panel.draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
    values, counts = np.unique(labels[labels >= 0], return_counts=True)
    order = np.argsort(-counts, kind="stable")[:LEGEND_ENTRIES] if len(values) > LEGEND_ENTRIES else range(len(values))
    panel.legend(None, f"{len(values)} {names}{', largest:' if len(values) > LEGEND_ENTRIES else ':'}")
    for i in order:
        panel.legend(label_colour(values[i]), f"{name} {values[i]} ({counts[i]})")
    if len(values) > LEGEND_ENTRIES:
        panel.legend(None, f"+ {len(values) - LEGEND_ENTRIES} more")
    if (labels < 0).any():
        panel.legend(UNLABELLED, f"unlabelled ({int((labels < 0).sum())})")
    return panel.image


def cluster_figure(points: np.ndarray, pseudo: np.ndarray, labels: np.ndarray, epoch: int) -> np.ndarray:
    """(n, 2) whitened components coloured by pseudo label and, if any of `labels` is >= 0 (ground truth;
    < 0 = unlabelled), a second panel coloured by it -> (PANEL_HEIGHT, 1 or 2 PANEL_WIDTH, 3) uint8."""
    points, labels = np.asarray(points, np.float64), np.asarray(labels)
    panels = [_scatter_panel(points, np.asarray(pseudo), f"pseudo labels, epoch {epoch}", "prototype", "prototypes")]
    if (labels >= 0).any():
        panels.append(_scatter_panel(points, labels, f"ground truth, epoch {epoch}", "class", "classes"))
    return _side_by_side(panels)


def _side_by_side(panels):
    figure = Image.new("RGB", (PANEL_WIDTH * len(panels), PANEL_HEIGHT), "white")
    for i, panel in enumerate(panels):
        figure.paste(panel, (i * PANEL_WIDTH, 0))
    return np.asarray(figure)


def _lines_panel(series, title, ylabel):
    """{name: (steps, values)} as lines (a dot where a series has one value) against the step."""
    steps = np.concatenate([s for s, _ in series.values()]) if series else np.zeros(0)
    values = np.concatenate([v for _, v in series.values()]) if series else np.zeros(0)
    panel = _Panel(title, "step", ylabel, _limits(steps, 0.02), _limits(values))
    for (name, (s, v)), colour in zip(series.items(), itertools.cycle(SERIES_COLOURS)):
        xy = [(panel.x(a), panel.y(b)) for a, b in zip(s, v)]
        if len(xy) == 1:
            panel.draw.ellipse((xy[0][0] - 3, xy[0][1] - 3, xy[0][0] + 3, xy[0][1] + 3), fill=colour)
        else:
            panel.draw.line(xy, fill=colour, width=2, joint="curve")
        panel.legend(colour, name, line=True)
    if not series:
        panel.legend(None, "no values logged")
    return panel.image


def _series(records, key):
    """(steps, values) of the finite values of `key`; a step logged twice (a resumed run) keeps its last."""
    by_step = {r["step"]: r[key] for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])}
    steps = np.asarray(sorted(by_step), np.float64)
    return steps, np.asarray([by_step[s] for s in sorted(by_step)], np.float64)


def losses_figure(records: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Every `train/loss*` term and `train/lr` of `metrics.jsonl` records against the step, in two panels
    -> (PANEL_HEIGHT, 2 PANEL_WIDTH, 3) uint8."""
    keys = sorted({k for r in records for k in r if k.startswith("train/loss")}, key=lambda k: (k != "train/loss", k))
    losses = {("total" if k == "train/loss" else k[len("train/loss_"):]): _series(records, k) for k in keys}
    lr = {"learning rate": _series(records, "train/lr")}
    return _side_by_side([_lines_panel({k: v for k, v in losses.items() if len(v[0])}, "training losses", "loss"),
                          _lines_panel({k: v for k, v in lr.items() if len(v[0])}, "learning rate", "learning rate")])


def save_png(image: np.ndarray, path: str | os.PathLike) -> None:
    """Writes an (H, W, 3) uint8 image as a PNG that appears whole or not at all."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    write_atomic(path, lambda f: f.write(buffer.getvalue()))
