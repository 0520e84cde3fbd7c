"""Panels: pure tensor -> uint8 picture / float32 clip rendering, and the panel set of each modality (the sinks they
are sent to are in :mod:`pl_pmse.sinks`)."""

from .audio import clip, mel_profile_panel, spectrogram_panel, waveform_overlay
from .image import comparison_grid, error_map_panel, spectrum_panel
from .sets import PANEL_SETS, PanelSet

__all__ = [
    "PANEL_SETS",
    "PanelSet",
    "clip",
    "comparison_grid",
    "error_map_panel",
    "mel_profile_panel",
    "spectrogram_panel",
    "spectrum_panel",
    "waveform_overlay",
]
