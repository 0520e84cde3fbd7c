"""Image panels: target | prediction | error rows, the dataset error map and the radial spectra; the image panel set."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from torch import Tensor

from .render import as_float, colorbar, heatmap, line_plot, stack, titled, to_rgb, upscale
from .sets import (
    PANEL_SETS,
    Drawn,
    FiguresPanel,
    PanelOptions,
    PanelSet,
    Picture,
    ProfilePanel,
    Sample,
    SamplePanel,
    SetFigures,
    Table,
    profile_chart,
)

MIN_SIDE = 96


def comparison_grid(
    pairs: Sequence[tuple[Tensor, Tensor]],
    data_range: tuple[float, float],
    vmax: float | None = None,
    labels: Sequence[str] | None = None,
    inputs: Sequence[Tensor] | None = None,
) -> tuple[np.ndarray, float]:
    """Rows of [input |] target | prediction | squared error (mean over channels), each row titled with its
    ``labels`` entry (its values), on ONE error scale: ``vmax`` (kept fixed across epochs by the caller) or this
    panel's largest. ``inputs``: the model inputs, shown first at their own size (a low-resolution input too).

    Returns the picture and the top of the error scale (in squared data units).

    Example:
        >>> import torch
        >>> picture, vmax = comparison_grid([(torch.zeros(3, 8, 8), torch.full((3, 8, 8), 0.5))], (0.0, 1.0))
        >>> picture.dtype, vmax
        (dtype('uint8'), 0.25)
    """
    errors = [(p.double() - t.double()).square().mean(0) for t, p in pairs]
    vmax = vmax if vmax is not None else max(float(e.max()) for e in errors) or 1.0
    rows = []
    for index, ((target, preds), error) in enumerate(zip(pairs, errors, strict=True)):
        shown = (inputs[index], target, preds) if inputs else (target, preds)
        cells = [upscale(to_rgb(x, data_range), MIN_SIDE) for x in shown]
        cells.append(upscale(heatmap(error, vmax), MIN_SIDE))
        if index == 0:
            titles = ("input", "target", "prediction", "error")[-len(cells) :]
            cells = [titled(cell, title) for cell, title in zip(cells, titles, strict=True)]
        row = stack(cells, axis=1)
        rows.append(titled(row, labels[index]) if labels else row)
    grid = stack(rows, axis=0)
    bar = colorbar(cells[-1].shape[1], vmax)
    return stack([grid, np.pad(bar, [(0, 0), (grid.shape[1] - bar.shape[1], 0), (0, 0)], constant_values=255)], 0), vmax


def error_map_panel(error_map: Tensor, size: int = 256, vmax: float | None = None) -> np.ndarray:
    """The mean squared-error map over the dataset (pooled grid), on ``vmax`` (fixed by the caller) or its own."""
    vmax = vmax if vmax is not None else float(error_map.max()) or 1.0
    picture = upscale(heatmap(error_map, vmax), size)
    return stack([titled(picture, "mean squared error, whole set"), colorbar(picture.shape[1], vmax)], axis=0)


def spectrum_panel(profile: Mapping[str, Tensor]) -> np.ndarray:
    """Radial power spectra of error, target and prediction: less power than the target at high frequencies
    means blur, more means hallucinated detail or noise. With ``profile["sharpness"]``, its value in the title and
    a dashed line where its band starts (``profile["sharpness_cutoff"]``)."""
    series = {"error": profile["error"], "target": profile["target"], "prediction": profile["preds"]}
    title = "radial power spectrum, mean over the set (log10)"
    sharpness = profile.get("sharpness")
    if sharpness is not None:
        title += f"; sharpness {float(sharpness):.3g} (from the dashed line up)"
    return line_plot(
        as_float(profile["frequency"]),
        {name: as_float(values) for name, values in series.items()},
        title,
        "frequency (cycles / pixel)",
        mark_x=float(profile["sharpness_cutoff"]) if sharpness is not None else None,
    )


def comparison_panel(figures: SetFigures) -> tuple[np.ndarray, list[str]]:
    """Every sample's Perception MSE against its PSNR and SSIM (one scatter each, Spearman's rank correlation in
    the title), and the labels of the samples where the rankings disagree most (first: the largest gap)."""
    columns = figures.columns
    pmse = np.asarray([row[columns.index("pmse")] for row in figures.rows], dtype=np.float64)
    plots, gaps = [], np.zeros(len(pmse))
    for name in columns[2:]:  # PSNR and/or SSIM: higher is better, where a lower Perception MSE is
        other = np.asarray([row[columns.index(name)] for row in figures.rows], dtype=np.float64)
        worse_pmse, worse_other = _ranks(pmse), _ranks(-other)  # 0: the best sample, by each measure
        rho = _spearman(worse_pmse, worse_other)
        gaps = np.maximum(gaps, np.abs(worse_pmse - worse_other))
        title = f"pmse vs {name} per sample (Spearman {rho:+.2f}: +1 when they agree)"
        plots.append(line_plot([], {"samples": (pmse, other)}, title, "pmse", log_y=False, points=True))
    picture = stack(plots, axis=0)
    order = np.argsort(-gaps, kind="stable")[:5]
    return picture, [figures.rows[i][0] for i in order if gaps[i] > 0]


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 0 (ties share their average rank, as Spearman's correlation takes them), NaN last."""
    _, inverse, counts = np.unique(np.nan_to_num(values, nan=np.inf), return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts
    return (starts + (counts - 1) / 2)[inverse]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


# -- the image panel set: each panel one function of (key, samples or profile, options, fixed scale) -------------


def sample_rows(key: str, samples: Sequence[Sample], options: PanelOptions, scale: float | None) -> Drawn:
    """[input |] target | prediction | error rows of the samples, on the panel's error scale."""
    inputs = [s.input for s in samples] if all(s.input is not None for s in samples) else None
    labels = [s.title() for s in samples]
    picture, vmax = comparison_grid([(s.target, s.preds) for s in samples], options.image_range, scale, labels, inputs)
    rows = "; ".join(s.caption() for s in samples)
    caption = f"rows: {rows}. Error scale 0 to {vmax:.4g} (fixed for this panel; brighter clips)"
    return Drawn((Picture(key, picture, caption),), vmax)


def worst_table(key: str, samples: Sequence[Sample], options: PanelOptions, scale: float | None) -> Drawn:
    """The worst samples' values, components and thumbnails as a table."""
    names = list(samples[0].components)
    thumbnail = lambda x: upscale(to_rgb(x, options.image_range), 64)  # noqa: E731
    rows = [[s.label, s.value, *(s.components[n] for n in names), thumbnail(s.target), thumbnail(s.preds)]
            for s in samples]  # fmt: skip
    return Drawn((Table(key, ["sample", "pmse", *names, "target", "prediction"], rows),))


def error_map(key: str, profile: Mapping[str, Tensor], options: PanelOptions, scale: float | None) -> Drawn:
    """The whole set's pooled squared-error map, on the scale of its first epoch."""
    values = profile["error_map"]
    caption = "mean squared error over the whole set, pooled (scale fixed from the first epoch)"
    return Drawn((Picture(key, error_map_panel(values, vmax=scale), caption),), float(values.max()) or 1.0)


def spectrum(key: str, profile: Mapping[str, Tensor], options: PanelOptions, scale: float | None) -> Drawn:
    """Radial power spectra of the error, the target and the prediction (and the set's sharpness)."""
    caption = "radial power spectra: error, target, prediction"
    if "sharpness" in profile:
        caption += (
            f"; sharpness {float(profile['sharpness']):.4g}: the prediction's power over the target's from "
            f"{float(profile['sharpness_cutoff']):g} cycles/pixel up (below 1: blur; above 1: noise or invented detail)"
        )
    return Drawn((Picture(key, spectrum_panel(profile), caption),))


MOST_TABLE_ROWS = 10_000  # W&B's table limit


def comparison(key: str, figures: SetFigures, options: PanelOptions) -> Drawn:
    """Every sample's Perception MSE, PSNR and SSIM: scatter plots, and the table (W&B) of all samples."""
    picture, disagree = comparison_panel(figures)
    caption = f"{len(figures.rows)} samples; rankings disagree most for: {', '.join(disagree) or 'none'}"
    table = Table(key.replace("panels/", "tables/"), figures.columns, figures.rows[:MOST_TABLE_ROWS])
    return Drawn((Picture(key, picture, caption), table))


SPECTRUM_CHART = profile_chart("radial power spectrum, mean over the set", "frequency (cycles / pixel)")
PANEL_SETS["image"] = PanelSet(
    modality="image",
    sample_panels=(SamplePanel("panels/{set}", sample_rows), SamplePanel("worst_table", worst_table, ("worst",))),
    profile_panels=(
        ProfilePanel("panels/error_map", error_map),
        ProfilePanel("panels/spectrum", spectrum),
        ProfilePanel("charts/spectrum", SPECTRUM_CHART),
    ),
    drawable=lambda sample, options: sample.target.dim() == 3,
    profile_options=lambda options, space: {"grid": options.error_map_grid, "bands": options.spectrum_bands},
    figures_panels=(FiguresPanel("panels/comparison", comparison),),
)
