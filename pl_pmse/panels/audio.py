"""Audio panels: waveform overlay, log-mel spectrograms of target / prediction / difference, playable clips; the
audio panel set."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from ..versions import require
from .render import BACKGROUND, SERIES_COLOURS, as_float, diverging, heatmap, line_plot, magma, stack, titled
from .sets import (
    PANEL_SETS,
    Clips,
    Drawn,
    PanelOptions,
    PanelSet,
    Picture,
    ProfilePanel,
    Sample,
    SamplePanel,
    profile_chart,
)

DYNAMIC_RANGE_DB = 80.0
DIFFERENCE_LIMIT_DB = 40.0
AXIS_MARGIN = 40  # the spectrograms' frequency labels; the waveform below is shifted alike, so that time lines up


def mono(x: Tensor) -> Tensor:
    """``[T]`` or ``[C, T]`` to a float64 ``[T]`` (channel mean)."""
    x = x.detach().cpu().double()
    return x.mean(0) if x.dim() == 2 else x


def clip(x: Tensor, data_range: tuple[float, float] | None) -> np.ndarray:
    """A playable float32 clip in [-1, 1]: ``[T]`` mono or ``[T, C]`` multichannel, as wandb and soundfile want."""
    x = x.detach().cpu().double()
    if data_range is not None:
        low, high = data_range
        x = (x - low) / (high - low) * 2 - 1
    x = x.clamp(-1, 1).float()
    return (x.T if x.dim() == 2 else x).numpy()


def log_mel_db(x: Tensor, sample_rate: int, n_mels: int = 64) -> Tensor:
    """Log-mel power in dB, ``[n_mels, frames]``, with an FFT size that fits short clips."""
    n_fft = int(min(1024, 2 ** np.floor(np.log2(max(x.shape[-1], 2)))))
    require("torchaudio")  # loaded on first use
    from torchaudio.transforms import MelSpectrogram

    transform = MelSpectrogram(
        sample_rate, n_fft=n_fft, hop_length=max(1, n_fft // 4), n_mels=min(n_mels, n_fft // 4 + 1)
    ).double()
    return 10 * torch.log10(transform(x) + 1e-10)


def spectrogram_panel(
    target: Tensor, preds: Tensor, sample_rate: int, height: int = 96, width: int = 640
) -> np.ndarray:
    """Three rows: target and prediction log-mel (shared dB scale, magma) and prediction - target (blue-red).

    Example:
        >>> import torch
        >>> spectrogram_panel(torch.randn(4000) * 0.1, torch.randn(4000) * 0.1, 16000).dtype
        dtype('uint8')
    """
    target_db, preds_db = (log_mel_db(mono(x), sample_rate).flip(0) for x in (target, preds))
    top = float(torch.maximum(target_db.max(), preds_db.max()))
    scale = lambda db: ((db - (top - DYNAMIC_RANGE_DB)) / DYNAMIC_RANGE_DB).numpy()  # noqa: E731
    axis = lambda picture: _frequency_axis(picture, target_db.shape[0], sample_rate)  # noqa: E731
    rows = [
        titled(axis(_stretch(magma(scale(target_db)), height, width)), f"target log-mel (dB, top {top:.1f})"),
        titled(axis(_stretch(magma(scale(preds_db)), height, width)), "prediction log-mel (same scale)"),
        titled(
            axis(_stretch(diverging((preds_db - target_db).numpy(), DIFFERENCE_LIMIT_DB), height, width)),
            f"prediction - target (blue -{DIFFERENCE_LIMIT_DB:.0f} dB, red +{DIFFERENCE_LIMIT_DB:.0f} dB)",
        ),
    ]
    return stack(rows, axis=0)


def mel_band_centres(n_mels: int, sample_rate: int) -> np.ndarray:
    """Centre frequencies (Hz) of ``n_mels`` HTK mel bands from 0 to ``sample_rate / 2``, lowest first."""
    top = 2595 * np.log10(1 + sample_rate / 2 / 700)
    mels = top * np.arange(1, n_mels + 1) / (n_mels + 1)
    return 700 * (10 ** (mels / 2595) - 1)


def _frequency_axis(picture: np.ndarray, n_mels: int, sample_rate: int, margin: int = AXIS_MARGIN) -> np.ndarray:
    """A labelled frequency axis (Hz, on the mel scale) left of a spectrogram drawn highest band at the top."""
    centres = mel_band_centres(n_mels, sample_rate)[::-1]
    strip = Image.new("RGB", (margin, picture.shape[0]), (BACKGROUND,) * 3)
    draw = ImageDraw.Draw(strip)
    for fraction in (0.0, 0.33, 0.66, 1.0):
        row = min(picture.shape[0] - 1, int(fraction * (picture.shape[0] - 1)))
        hertz = centres[min(n_mels - 1, int(fraction * (n_mels - 1)))]
        text = f"{hertz / 1000:.1f}k" if hertz >= 1000 else f"{hertz:.0f}"
        draw.line([(margin - 4, row), (margin - 1, row)], fill=(30, 30, 30))
        draw.text((2, max(0, min(row - 5, picture.shape[0] - 11))), text, fill=(30, 30, 30))
    return np.concatenate([np.asarray(strip), picture], 1)


def waveform_overlay(target: Tensor, preds: Tensor, width: int = 640, height: int = 140) -> np.ndarray:
    """Target (grey) and prediction (blue) drawn as min/max envelopes per pixel column, on one amplitude scale."""
    signals = [mono(x).numpy() for x in (target, preds)]
    limit = max(float(np.abs(s).max()) for s in signals) or 1.0
    image = Image.new("RGB", (width, height), (BACKGROUND,) * 3)
    draw = ImageDraw.Draw(image)
    middle = height / 2
    for signal, colour in zip(signals, ((150, 150, 150), SERIES_COLOURS[1]), strict=True):
        columns = np.array_split(signal, width) if signal.size >= width else [signal[[i]] for i in range(signal.size)]
        step = width / len(columns)
        for index, column in enumerate(columns):
            x = int(index * step)
            low, high = float(column.min()), float(column.max())
            draw.line([(x, middle - high / limit * middle * 0.95), (x, middle - low / limit * middle * 0.95)],
                      fill=colour)  # fmt: skip
    picture = np.pad(np.asarray(image), [(0, 0), (AXIS_MARGIN, 0), (0, 0)], constant_values=BACKGROUND)
    return titled(picture, f"waveform: target (grey), prediction (blue); peak {limit:.3g}")  # in line with the rows


def mel_profile_panel(profile: Mapping[str, Tensor]) -> np.ndarray:
    """Per mel band over the whole set: the squared log-mel error, and the power of target and prediction."""
    frequency = as_float(profile["frequency"])
    error = line_plot(frequency, {"squared log-mel error": as_float(profile["error"])},
                      "error per mel band, mean over the set (log10)", "frequency (Hz)")  # fmt: skip
    power = line_plot(frequency, {"target": as_float(profile["target"]), "prediction": as_float(profile["preds"])},
                      "mel power per band, mean over the set (log10)", "frequency (Hz)", first_colour=1)  # fmt: skip
    return stack([error, power], axis=0)


def _stretch(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a spectrogram picture to ``height`` x ``width`` (the waveform's width, so that time lines up)."""
    return np.asarray(Image.fromarray(image).resize((width, height), Image.NEAREST))


# -- the audio panel set ----------------------------------------------------------------------------------------


def sample_rows(key: str, samples: Sequence[Sample], options: PanelOptions, scale: float | None) -> Drawn:
    """Per sample: log-mel spectrograms of target and prediction, their difference, and the waveforms."""
    rows = [
        stack([spectrogram_panel(s.target, s.preds, options.sample_rate), waveform_overlay(s.target, s.preds)], axis=0)
        for s in samples
    ]
    return Drawn((Picture(key, stack(rows, axis=0), "; ".join(s.caption() for s in samples)),))


def playable_clips(key: str, samples: Sequence[Sample], options: PanelOptions, scale: float | None) -> Drawn:
    """The target and prediction clips of the samples."""
    captions = [s.caption() for s in samples]
    return Drawn(tuple(
        Clips(f"{key}_{role}", [clip(pick(s), options.data_range) for s in samples], options.sample_rate,
              [f"{role}: {caption}" for caption in captions])
        for role, pick in (("target", lambda s: s.target), ("prediction", lambda s: s.preds))
    ))  # fmt: skip


def feature_views(key: str, samples: Sequence[Sample], options: PanelOptions, scale: float | None) -> Drawn:
    """Per sample, the space's views of target and prediction (``Space.views``; ``audio-aspects``: pitch-class
    profiles and onset envelopes): maps one above the other on one scale, curves overlaid, over the clip's duration.
    Nothing for spaces without views."""
    drawn = [s for s in samples if s.views]
    if not drawn:
        return Drawn(())
    blocks = [
        titled(stack([view_picture(title, *pair, s.target.shape[-1] / options.sample_rate)
                      for title, pair in s.views.items()], axis=0), s.title())
        for s in drawn
    ]  # fmt: skip
    return Drawn((Picture(key, stack(blocks, axis=0), "; ".join(s.caption() for s in drawn)),))


def view_picture(title: str, target: Tensor, preds: Tensor, seconds: float, width: int = 640) -> np.ndarray:
    """One view of target and prediction: a map ``[rows, frames]`` drawn twice on one scale (lowest row at the
    bottom), or a curve ``[frames]`` of both.

    Example:
        >>> import torch
        >>> view_picture("onset strength", torch.rand(50), torch.rand(50), 1.0).shape[2]
        3
    """
    if target.dim() == 1:
        x = np.linspace(0.0, seconds, target.numel()).tolist()
        series = {"target": as_float(target), "prediction": as_float(preds)}
        return line_plot(x, series, title, "time (s)", log_y=False, size=(width + AXIS_MARGIN, 180), first_colour=1)
    top = float(torch.maximum(target.max(), preds.max()))
    height = max(48, 6 * target.shape[0])
    rows = [
        titled(np.pad(_stretch(heatmap(x.flip(0), top), height, width), [(0, 0), (AXIS_MARGIN, 0), (0, 0)],
                      constant_values=BACKGROUND), f"{title}: {role} (0 to {top:.3g})")
        for role, x in (("target", target), ("prediction", preds))
    ]  # fmt: skip
    return stack(rows, axis=0)


def mel_profile(key: str, profile: Mapping[str, Tensor], options: PanelOptions, scale: float | None) -> Drawn:
    """Per mel band over the whole set: the error, and the power of target and prediction."""
    caption = "per mel band: squared log-mel error; target and prediction power"
    return Drawn((Picture(key, mel_profile_panel(profile), caption),))


PANEL_SETS["audio"] = PanelSet(
    modality="audio",
    sample_panels=(
        SamplePanel("panels/{set}", sample_rows),
        SamplePanel("audio/{set}", playable_clips),
        SamplePanel("panels/{set}_views", feature_views),
    ),
    profile_panels=(
        ProfilePanel("panels/mel_profile", mel_profile),
        ProfilePanel("charts/mel_profile", profile_chart("per mel band, mean over the set", "frequency (Hz)")),
    ),
    drawable=lambda sample, options: True,
    profile_options=lambda options, space: (
        {"sample_rate": options.sample_rate, **space.profile_options()} if options.sample_rate else None
    ),
    missing=lambda options: None if options.sample_rate else "sample_rate=...",
)
