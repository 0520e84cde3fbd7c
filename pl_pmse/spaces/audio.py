"""Audio spaces: the raw waveform, log-mel and multi-resolution log-STFT."""

from __future__ import annotations

from collections.abc import Mapping

from .base import Space, register_space


class AudioSpace(Space):
    """Audio batches: mono ``[N, T]`` or multichannel ``[N, C, T]``, float in [-1, 1] by default."""

    raw_name = "waveform"
    expected_range = (-1.0, 1.0)
    layout = "audio [N, T] or [N, C, T]"
    allowed_ndim = (2, 3)


@register_space("waveform")
class WaveformSpace(AudioSpace):
    """The raw waveform: Perception MSE here is the sample-wise MSE.

    Example:
        >>> import torch
        >>> WaveformSpace().component_names
        ('waveform',)
    """

    name = "waveform"

    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        super().__init__(weights=weights)
