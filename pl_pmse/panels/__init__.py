"""Panels: pure tensor -> uint8 picture / float32 clip rendering, and the sinks they are sent to."""

from .audio import clip, mel_profile_panel, spectrogram_panel, waveform_overlay
from .image import comparison_grid, error_map_panel, spectrum_panel
from .sinks import FileSink, Sink, TensorBoardSink, WandbSink, sinks_for

__all__ = [
    "FileSink",
    "Sink",
    "TensorBoardSink",
    "WandbSink",
    "clip",
    "comparison_grid",
    "error_map_panel",
    "mel_profile_panel",
    "sinks_for",
    "spectrogram_panel",
    "spectrum_panel",
    "waveform_overlay",
]
