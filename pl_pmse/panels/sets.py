"""What a panel set is: the samples and options panels are drawn from, what a panel returns, and one set per
modality (:data:`PANEL_SETS`, filled by :mod:`.image` and :mod:`.audio`).

A panel is a pure function: from samples (or the dataset profile), the options and the error scale it fixed in an
earlier epoch, it returns :class:`Drawn` (artifacts for the sinks, and the scale it fixes now). It reads nothing
else and writes nothing: the callback hands it an immutable epoch report and keeps the scales itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor


@dataclass(order=True, frozen=True)
class Sample:
    """One sample kept for a panel: its Perception MSE, components and tensors (CPU copies the panel thread owns).

    Samples order by value, ties by ``-position`` (its place in the sampler's order over all ranks): among equal
    values the earlier sample ranks as worse, so the worst k are the same whatever the batch split or world size."""

    value: float
    earlier: int = field(repr=False)  # minus the position: ties go to the earlier sample, as in one process
    label: str = field(compare=False)
    components: Mapping[str, float] = field(compare=False)
    preds: Tensor = field(compare=False)
    target: Tensor = field(compare=False)
    input: Tensor | None = field(default=None, compare=False)  # the model input, when validation_step returns it
    # the space's views of target and prediction (Space.views: {title: (target, prediction)}), where it has any
    views: Mapping[str, tuple[Tensor, Tensor]] = field(default_factory=dict, compare=False)

    def caption(self) -> str:
        parts = ", ".join(f"{name} {value:.4g}" for name, value in self.components.items())
        return f"{self.label}: pmse {self.value:.4g} ({parts})"

    def title(self) -> str:
        """The short form written on the panel's row (the caption has every component)."""
        return f"{self.label}: pmse {self.value:.4g}"


@dataclass(frozen=True)
class PanelOptions:
    """What panels are drawn with: the data's value range (``None``: ``[0, 1]`` pictures, ``[-1, 1]`` clips), the
    audio's sample rate, and the sizes of the dataset profile."""

    data_range: tuple[float, float] | None = None
    sample_rate: int | None = None
    error_map_grid: int = 32
    spectrum_bands: int = 32

    @property
    def image_range(self) -> tuple[float, float]:
        return self.data_range or (0.0, 1.0)


@dataclass(frozen=True)
class Picture:
    """A drawn panel: ``uint8 [H, W, 3]`` with its caption."""

    key: str
    image: np.ndarray
    caption: str
    kind = "image"


@dataclass(frozen=True)
class Clips:
    """Playable clips (float32 in [-1, 1]) with their captions."""

    key: str
    clips: Sequence[np.ndarray]
    sample_rate: int
    captions: Sequence[str]
    kind = "audio"


@dataclass(frozen=True)
class Table:
    """Rows of values and thumbnails (``uint8`` pictures), for the sinks that show tables (W&B)."""

    key: str
    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]
    kind = "table"


@dataclass(frozen=True)
class Chart:
    """An interactive line chart (W&B) of series over ``x``; the other sinks have the drawn plot."""

    key: str
    x: Sequence[float]
    series: Mapping[str, Sequence[float]]
    title: str
    x_label: str
    kind = "chart"


Artifact = Picture | Clips | Table | Chart


@dataclass(frozen=True)
class SetFigures:
    """The epoch's figures of the whole set: the scalars logged beside Perception MSE (``{"sharpness": 0.8}``) and
    every sample's values over all ranks (``columns``: ``"sample"`` then the values' names; ``rows``: one per
    sample, its label then its values)."""

    values: Mapping[str, float] = field(default_factory=dict)
    columns: tuple[str, ...] = ()
    rows: tuple[tuple[Any, ...], ...] = ()


@dataclass(frozen=True)
class Drawn:
    """What a panel returns: its artifacts, and the error scale it fixed (drawn on from then on; None: none)."""

    artifacts: tuple[Artifact, ...]
    scale: float | None = None


SampleDraw = Callable[[str, Sequence[Sample], PanelOptions, "float | None"], Drawn]
ProfileDraw = Callable[[str, Mapping[str, Tensor], PanelOptions, "float | None"], Drawn]
FiguresDraw = Callable[[str, SetFigures, PanelOptions], Drawn]


@dataclass(frozen=True)
class SamplePanel:
    """A panel of the fixed and/or worst samples: ``key`` under the prefix (``{set}``: ``fixed`` or ``worst``)."""

    key: str
    draw: SampleDraw
    sets: tuple[str, ...] = ("fixed", "worst")


@dataclass(frozen=True)
class ProfilePanel:
    """A panel of the dataset profile (:class:`~pl_pmse.profile.ErrorProfile`'s result)."""

    key: str
    draw: ProfileDraw


@dataclass(frozen=True)
class FiguresPanel:
    """A panel of every sample's figures (:class:`SetFigures`), drawn when the epoch has per-sample rows."""

    key: str
    draw: FiguresDraw


@dataclass(frozen=True)
class PanelSet:
    """The panels of one modality, what they need, and the dataset profile they draw from.

    ``missing(options)``: what the panels need and the options lack (``None``: nothing), e.g. audio's sample rate;
    ``drawable(sample, options)``: whether samples of this shape can be drawn; ``profile_options(options, space)``:
    the :class:`~pl_pmse.profile.ErrorProfile` options for this modality (``None``: no profile can be taken).
    Profile panels also see the set's scalar figures (``profile["sharpness"]``) where the epoch has them."""

    modality: str
    sample_panels: tuple[SamplePanel, ...]
    profile_panels: tuple[ProfilePanel, ...]
    drawable: Callable[[Sample, PanelOptions], bool]
    profile_options: Callable[[PanelOptions, Any], dict[str, Any] | None]
    missing: Callable[[PanelOptions], str | None] = lambda options: None
    figures_panels: tuple[FiguresPanel, ...] = ()


PANEL_SETS: dict[str, PanelSet] = {}


def profile_chart(title: str, x_label: str) -> ProfileDraw:
    """A profile panel of the error, target and prediction series as an interactive chart."""

    def chart(key: str, profile: Mapping[str, Tensor], options: PanelOptions, scale: float | None) -> Drawn:
        series = {label: profile[name].tolist() for name, label in (("error", "error"), ("target", "target"),
                                                                    ("preds", "prediction"))}  # fmt: skip
        return Drawn((Chart(key, profile["frequency"].tolist(), series, title, x_label),))

    return chart
