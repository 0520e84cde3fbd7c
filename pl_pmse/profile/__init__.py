"""Where the error lives over a whole dataset: :class:`ErrorProfile` (the shared base) and the modalities'
analyses (:mod:`.image`, :mod:`.audio`)."""

from . import audio, image  # noqa: F401  (register the analyses)
from .base import ANALYSES, Analysis, ErrorProfile
from .image import radial_band_of_frequencies, radial_power

__all__ = ["ANALYSES", "Analysis", "ErrorProfile", "radial_band_of_frequencies", "radial_power"]
