"""The epoch report: what the hooks collected in one epoch, as an immutable value, and its drawing on the panel
thread (:func:`draw_report`): the modality's panel set draws the report, every sink prepares each artifact, and
the error scales fixed by the panels are kept in the worker's epoch for the callback to take on the training thread.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..panels.sets import Drawn, PanelOptions, PanelSet, Sample, SetFigures
from ..profile import ErrorProfile
from ..sinks import Sink
from .worker import Draw, Epoch


@dataclass(frozen=True)
class SyncedProfile:
    """A dataset profile summed over all ranks (``state``), computed into its named parts when drawn."""

    profile: ErrorProfile
    state: Tensor

    def values(self) -> dict[str, Tensor]:
        return self.profile.profile_of(self.state)


@dataclass(frozen=True)
class ReportPart:
    """One dataloader's share of the report: its key prefix, samples, profile and the set's figures."""

    prefix: str
    fixed: tuple[Sample, ...]
    worst: tuple[Sample, ...]
    profile: SyncedProfile | None
    figures: SetFigures = field(default_factory=SetFigures)


@dataclass(frozen=True)
class EpochReport:
    """Everything one epoch's panels are drawn from; ``scales``: the error scales fixed in earlier epochs."""

    label: str
    step: int
    panel_set: PanelSet
    options: PanelOptions
    parts: tuple[ReportPart, ...]
    scales: Mapping[str, float]


def draw_report(report: EpochReport, sinks: list[Sink]) -> Draw:
    """The worker's job for ``report``: draw every panel due, prepare it for every sink, flush the sinks."""

    def draw(epoch: Epoch) -> None:
        epoch.sinks = [sink for sink in sinks if repr(sink) not in epoch.skipped_sinks]
        for part in report.parts:
            for key, panel in _panels_due(epoch, report, part):
                drawn = epoch.guard(f"drawing {key}", panel)  # one failing panel does not hide the others
                if drawn is None:
                    continue
                if drawn.scale is not None:
                    epoch.scales.setdefault(key, drawn.scale)
                for artifact in drawn.artifacts:
                    _prepare(epoch, artifact.kind, lambda sink, a=artifact: sink.prepare(a, report.step))
        _prepare(epoch, "epoch row", lambda sink: sink.flush(report.step))  # W&B: all panels in one history row

    return draw


def _panels_due(epoch: Epoch, report: EpochReport, part: ReportPart) -> list[tuple[str, Callable[[], Drawn]]]:
    """``(key, draw)`` of the panels of one part: the set's sample panels of the fixed and the worst samples, its
    profile panels when the profile was computed (a failure there leaves out the profile panels only; they also see
    the set's scalar figures), and its figures panels when there are per-sample figures."""
    panels: list[tuple[str, Callable[[], Drawn]]] = []
    options, scales = report.options, report.scales
    for set_name, samples in (("fixed", part.fixed), ("worst", part.worst)):
        if not samples or not report.panel_set.drawable(samples[0], options):
            continue
        for panel in report.panel_set.sample_panels:
            if set_name in panel.sets:
                key = f"{part.prefix}/{panel.key.format(set=set_name)}"
                panels.append((key, lambda p=panel, k=key, s=samples: p.draw(k, s, options, scales.get(k))))
    if part.profile is not None:
        profile = epoch.guard(f"computing the {part.prefix} error profile", part.profile.values)
        if profile is not None and bool(torch.isfinite(profile["error"]).all()):  # NaN: no sample was profiled
            figures = {name: torch.tensor(value, dtype=torch.float64) for name, value in part.figures.values.items()}
            profile = {**profile, **figures}
            for panel in report.panel_set.profile_panels:
                key = f"{part.prefix}/{panel.key}"
                panels.append((key, lambda p=panel, k=key: p.draw(k, profile, options, scales.get(k))))
    if part.figures.rows:
        for panel in report.panel_set.figures_panels:
            key = f"{part.prefix}/{panel.key}"
            panels.append((key, lambda p=panel, k=key: p.draw(k, part.figures, options)))
    return panels


def _prepare(epoch: Epoch, kind: str, call: Callable[[Sink], Any]) -> None:
    """Prepare a panel for every sink (encoding, files: here, on the worker); the logger calls left to make wait
    for the epoch's delivery window."""
    for sink in epoch.sinks:
        what = f"{sink!r} {kind}"
        send = epoch.guard(what, lambda sink=sink: call(sink))
        if send is not None:
            epoch.send(repr(sink), f"{what} (logging)", send)
