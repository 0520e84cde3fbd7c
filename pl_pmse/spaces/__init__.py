"""Perception spaces: the raw signal and feature spaces, by name or as objects.

| name | components (default weight) |
|---|---|
| ``pixel`` | ``pixel`` (1) |
| ``pyramid`` | ``pixel`` (1), ``band0`` ... ``band3``, ``lowpass`` (1 each) |
| ``aspects`` | ``pixel`` (0), ``luminance``, ``colour``, ``edges``, ``texture`` (1 each) |
| ``vgg16`` / ``alexnet`` / ``squeezenet`` | ``pixel`` (1), the LPIPS layers (1 each) |
| ``vgg19`` | ``pixel`` (1), Real-ESRGAN's ``conv1_2`` ... ``conv5_4`` (1 each) |
| ``lpips-alex`` / ``lpips-vgg`` / ``lpips-squeeze`` | ``pixel`` (0), the calibrated LPIPS layers (1 each) |
| ``waveform`` | ``waveform`` (1) |
| ``mel`` | ``waveform`` (0), ``mel`` (1) |
| ``mrstft`` | ``waveform`` (0), ``stft512``, ``stft1024``, ``stft2048`` (1 each) |
| ``audio-aspects`` | ``waveform`` (0), ``timbre``, ``pitch``, ``rhythm`` (1 each) |
| ``wav2vec2`` / ``hubert`` / ``wavlm`` | ``waveform`` (0), the transformer layers ``layer1`` ... ``layer8`` (base) |
"""

from .audio import AudioSpace, MelSpace, MultiResolutionSTFT, WaveformSpace
from .audio_aspects import AudioAspects
from .backbones import Backbone, LPIPSSpace, imagenet_weights_path, load_backbone, lpips_calibration
from .base import Space
from .image import ImageAspects, ImageSpace, LaplacianPyramid, PixelSpace
from .registry import available_spaces, get_space, register_space
from .speech import SpeechModelSpace, load_speech_model, speech_weights_path

__all__ = [
    "AudioAspects",
    "AudioSpace",
    "Backbone",
    "ImageAspects",
    "ImageSpace",
    "LPIPSSpace",
    "LaplacianPyramid",
    "MelSpace",
    "MultiResolutionSTFT",
    "PixelSpace",
    "Space",
    "SpeechModelSpace",
    "WaveformSpace",
    "available_spaces",
    "get_space",
    "imagenet_weights_path",
    "load_backbone",
    "load_speech_model",
    "lpips_calibration",
    "register_space",
    "speech_weights_path",
]
