"""Perception spaces: the raw signal and feature spaces, by name or as objects."""

from .audio import AudioSpace, WaveformSpace
from .base import Space, available_spaces, get_space, register_space
from .image import PixelSpace

__all__ = [
    "AudioSpace",
    "PixelSpace",
    "Space",
    "WaveformSpace",
    "available_spaces",
    "get_space",
    "register_space",
]
