"""Drawing primitives for panels: colour maps, value scaling, labels, stacking and line plots (numpy + Pillow).

Everything returns ``uint8`` arrays ``[H, W, 3]``: wandb >= 0.19 no longer rescales float images.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

BACKGROUND = 255
INK = (30, 30, 30)
# Okabe & Ito's colour-blind-safe set: black, blue, orange, bluish green (error, target, prediction, ...)
SERIES_COLOURS = ((0, 0, 0), (0, 114, 178), (230, 159, 0), (0, 158, 115))


@functools.cache
def default_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font, loaded once."""
    return ImageFont.load_default()


@functools.cache
def colour_table(name: str) -> np.ndarray:
    """matplotlib's colour map ``name`` at its 256 levels, ``uint8 [256, 3]`` (the library's own table, no fit)."""
    import matplotlib

    return matplotlib.colormaps[name](np.linspace(0, 1, 256), bytes=True)[:, :3]


def _levels(t: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (clipped; NaN as 0) to table indices 0..255."""
    return (np.nan_to_num(np.clip(t, 0, 1)) * 255).round().astype(np.intp)


def magma(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (clipped; NaN as 0) to ``uint8`` RGB with matplotlib's magma map, at 256 levels."""
    return colour_table("magma")[_levels(np.asarray(values, dtype=np.float64))]


def diverging(values: np.ndarray, limit: float) -> np.ndarray:
    """matplotlib's ``coolwarm``: blue (negative), light grey (0), red (positive), symmetric in ``[-limit, limit]``."""
    t = np.asarray(values, dtype=np.float64) / max(limit, 1e-12)
    return colour_table("coolwarm")[_levels((t + 1) / 2)]


def heatmap(values: Tensor | np.ndarray, vmax: float) -> np.ndarray:
    """A non-negative map ``[H, W]`` in magma on the shared scale ``[0, vmax]``."""
    values = values.detach().cpu().double().numpy() if isinstance(values, Tensor) else np.asarray(values)
    return magma(values / vmax if vmax > 0 else np.zeros_like(values))


def to_rgb(image: Tensor, data_range: tuple[float, float]) -> np.ndarray:
    """``[C, H, W]`` in ``data_range`` to ``uint8 [H, W, 3]``: 3 channels as RGB, 4 as RGBA over a grey checkerboard
    (transparency shows), 2 as grey with alpha, any other count as grey (the first channel)."""
    low, high = data_range
    image = ((image.detach().cpu().double() - low) / (high - low)).clamp(0, 1)
    channels = image.shape[0]
    colour = image[:3] if channels in (3, 4) else image[:1].expand(3, -1, -1)
    if channels in (2, 4):  # the last channel is alpha
        alpha = image[-1:]
        rows, columns = torch.meshgrid(torch.arange(image.shape[1]), torch.arange(image.shape[2]), indexing="ij")
        board = torch.where((rows // 8 + columns // 8) % 2 == 0, 0.8, 0.6).double()[None]
        colour = colour * alpha + board * (1 - alpha)
    return (colour.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def upscale(image: np.ndarray, min_side: int) -> np.ndarray:
    """Nearest-neighbour enlargement so that the shorter side reaches ``min_side`` (tiny images stay readable)."""
    factor = max(1, math.ceil(min_side / max(1, min(image.shape[:2]))))
    if factor == 1:
        return image
    height, width, channels = image.shape
    blocks = np.broadcast_to(image[:, None, :, None], (height, factor, width, factor, channels))
    return blocks.reshape(height * factor, width * factor, channels)


def stack(images: Sequence[np.ndarray], axis: int, gap: int = 4) -> np.ndarray:
    """Place images side by side (``axis=1``) or on top of each other (``axis=0``) on a white background."""
    across = 1 - axis
    shape = [0, 0, 3]
    shape[across] = max(image.shape[across] for image in images)
    shape[axis] = sum(image.shape[axis] for image in images) + gap * (len(images) - 1)
    canvas = np.full(shape, BACKGROUND, dtype=np.uint8)
    start = 0
    for image in images:
        end = start + image.shape[axis]
        if axis == 0:
            canvas[start:end, : image.shape[1]] = image
        else:
            canvas[: image.shape[0], start:end] = image
        start = end + gap
    return canvas


def titled(image: np.ndarray, title: str, height: int = 16) -> np.ndarray:
    """A strip of text above ``image``."""
    strip = Image.new("RGB", (image.shape[1], height), (BACKGROUND,) * 3)
    ImageDraw.Draw(strip).text((3, 2), title, fill=INK, font=default_font())
    return np.concatenate([np.asarray(strip), image], 0)


def line_plot(
    x: Sequence[float],
    series: Mapping[str, Sequence[float]],
    title: str,
    x_label: str,
    log_y: bool = True,
    size: tuple[int, int] = (520, 320),
    first_colour: int = 0,
    points: bool = False,
    mark_x: float | None = None,
) -> np.ndarray:
    """A small line plot with axes, tick labels and a legend (no plotting library needed); series take
    ``SERIES_COLOURS`` in order from ``first_colour`` (so that target and prediction keep their colours).
    ``points``: a scatter plot (``x`` per series: pass ``{name: (xs, ys)}`` as ``series`` and ``x=[]``);
    ``mark_x``: a dashed vertical line there."""
    width, height = size
    left, right, top, bottom = 64, 16, 26, 40
    image = Image.new("RGB", size, (BACKGROUND,) * 3)
    draw, font = ImageDraw.Draw(image), default_font()
    transform = (lambda v: np.log10(np.maximum(v, 1e-30))) if log_y else (lambda v: v)
    pairs = {name: (xy if points else (x, xy)) for name, xy in series.items()}
    columns = {name: np.asarray(xy[0], dtype=np.float64) for name, xy in pairs.items()}
    values = {name: transform(np.asarray(xy[1], dtype=np.float64)) for name, xy in pairs.items()}
    xs = np.concatenate([v[np.isfinite(v)] for v in columns.values()] or [np.zeros(1)])
    xs = xs if xs.size else np.zeros(1)
    finite = np.concatenate([v[np.isfinite(v)] for v in values.values()] or [np.zeros(1)])
    y_low, y_high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if y_high - y_low < 1e-12:
        y_low, y_high = y_low - 1, y_high + 1
    x_low, x_high = float(xs.min()), float(xs.max()) if xs.max() > xs.min() else float(xs.min()) + 1

    def point(xv: float, yv: float) -> tuple[float, float]:
        px = left + (xv - x_low) / (x_high - x_low) * (width - left - right)
        py = top + (1 - (yv - y_low) / (y_high - y_low)) * (height - top - bottom)
        return px, py

    draw.rectangle([left, top, width - right, height - bottom], outline=INK)
    for yv in _ticks(y_low, y_high, integer=log_y):
        _, py = point(x_low, yv)
        draw.line([(left - 4, py), (left, py)], fill=INK)
        draw.text((4, py - 6), _tick_label(yv, log_y), fill=INK, font=font)
    for xv in _ticks(x_low, x_high):
        px, _ = point(xv, y_low)
        draw.line([(px, height - bottom), (px, height - bottom + 4)], fill=INK)
        text = f"{xv:.3g}"
        draw.text((min(px - 12, width - 6 * len(text) - 2), height - bottom + 6), text, fill=INK, font=font)
    draw.text((left, 6), title, fill=INK, font=font)
    draw.text((width // 2 - 40, height - 16), x_label, fill=INK, font=font)
    if mark_x is not None and x_low <= mark_x <= x_high:
        px, _ = point(mark_x, y_low)
        for y0 in range(top, height - bottom, 8):
            draw.line([(px, y0), (px, min(y0 + 4, height - bottom))], fill=INK)
    for index, (name, ys) in enumerate(values.items()):
        colour = SERIES_COLOURS[(first_colour + index) % len(SERIES_COLOURS)]
        drawn = [point(xv, yv) for xv, yv in zip(columns[name], ys, strict=True) if np.isfinite(xv) and np.isfinite(yv)]
        if points:
            for px, py in drawn:
                draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        elif len(drawn) > 1:
            draw.line(drawn, fill=colour, width=2)
        legend_y = top + 10 + 14 * index
        if points:  # the legend shows what the plot draws: a dot, or a line
            draw.ellipse([width - right - 123, legend_y - 3, width - right - 117, legend_y + 3], fill=colour)
        else:
            draw.line([(width - right - 130, legend_y), (width - right - 110, legend_y)], fill=colour, width=3)
        draw.text((width - right - 104, legend_y - 6), name, fill=colour, font=font)
    return np.asarray(image)


def _tick_label(value: float, log: bool) -> str:
    """A y tick: ``1e+02`` on whole decades of a log axis, the value itself (``10 ** value`` on a log axis) else."""
    if log and float(value).is_integer():
        return f"1e{value:+03.0f}"
    return f"{10**value if log else value:.3g}"


def _ticks(low: float, high: float, integer: bool = False, count: int = 5) -> list[float]:
    """Tick positions: whole numbers (decades on a log axis) when there are enough of them, else even steps."""
    if integer and np.floor(high) - np.ceil(low) >= 1:
        step = max(1, int(np.ceil((np.floor(high) - np.ceil(low)) / count)))
        return [float(v) for v in np.arange(np.ceil(low), np.floor(high) + 1, step)]
    return [float(v) for v in np.linspace(low, high, count)]


def colorbar(width: int, vmax: float, height: int = 10) -> np.ndarray:
    """A magma gradient from 0 to ``vmax`` with its end values written under it."""
    bar = magma(np.tile(np.linspace(0, 1, width), (height, 1)))
    labels = Image.new("RGB", (width, 14), (BACKGROUND,) * 3)
    draw, font = ImageDraw.Draw(labels), default_font()
    draw.text((1, 1), "0", fill=INK, font=font)
    text = f"{vmax:.3g}"
    draw.text((width - 7 * len(text) - 1, 1), text, fill=INK, font=font)
    return np.concatenate([bar, np.asarray(labels)], 0)


def as_float(values: Tensor) -> list[float]:
    """A 1-d tensor as a list of Python floats."""
    return [float(v) for v in torch.as_tensor(values).flatten().tolist()]
