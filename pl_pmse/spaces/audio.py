"""Audio spaces: the raw waveform, log-mel and multi-resolution log-STFT (torchaudio transforms)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torchaudio
from torch import Tensor, nn

from .. import checks
from .base import Space
from .registry import register_space


class AudioSpace(Space):
    """Audio batches: mono ``[N, T]`` or multichannel ``[N, C, T]``, float in [-1, 1] by default."""

    raw_name = "waveform"
    modality = "audio"
    expected_range = (-1.0, 1.0)
    layout = "audio [N, T] or [N, C, T]"
    allowed_ndim = (2, 3)
    min_length = 1

    def check_input(self, x: Tensor) -> None:
        super().check_input(x)
        checks.check_min_size(x, self.min_length, "signals (samples along the last dimension)", self.name)


@register_space("waveform")
class WaveformSpace(AudioSpace):
    """The raw waveform: Perception MSE here is the sample-wise MSE.

    Example:
        >>> WaveformSpace().component_names
        ('waveform',)
    """

    name = "waveform"

    def __init__(self, component_weights: Mapping[str, float] | None = None) -> None:
        super().__init__(component_weights=component_weights)


@register_space("mel")
class MelSpace(AudioSpace):
    """Log-mel power spectrogram ``log(mel + eps)`` (torchaudio's ``MelSpectrogram``, centred, reflect-padded).

    Components: ``waveform`` (weight 0 by default: sample-wise error punishes harmless phase shifts) and ``mel``.
    The defaults (1024-point FFT, hop 256, 80 bands) suit speech and music at 16-48 kHz.

    Args:
        sample_rate: sample rate of the audio in Hz (required: the mel scale depends on it).
        n_fft, hop_length, win_length, n_mels, f_min, f_max, norm, mel_scale: as in torchaudio's MelSpectrogram
            (``hop_length`` defaults to ``n_fft // 4``).
        eps: added to the mel power inside the log.
        component_weights: ``{"waveform": w, "mel": w}`` overrides.

    Example:
        >>> import torch
        >>> space = MelSpace(sample_rate=16000)
        >>> space.features(torch.zeros(2, 16000))["mel"].shape
        torch.Size([2, 80, 63])
    """

    name = "mel"

    def __init__(
        self,
        sample_rate: int | None = None,
        n_fft: int = 1024,
        hop_length: int | None = None,
        win_length: int | None = None,
        n_mels: int = 80,
        f_min: float = 0.0,
        f_max: float | None = None,
        norm: str | None = None,
        mel_scale: str = "htk",
        eps: float = 1e-5,
        component_weights: Mapping[str, float] | None = None,
    ) -> None:
        if sample_rate is None or isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
            raise ValueError(
                f"sample_rate: space 'mel' needs the audio's sample rate in Hz (e.g. 16000), got {sample_rate!r}"
            )
        _check_fft(n_fft, hop_length, win_length)
        if f_max is not None and not f_min < f_max <= sample_rate / 2:
            raise ValueError(f"f_max: expected f_min < f_max <= sample_rate / 2 = {sample_rate / 2}, got {f_max}")
        super().__init__({"mel": 1.0}, raw_weight=0.0, component_weights=component_weights)
        self.eps = eps
        self.min_length = n_fft // 2 + 1
        self.transform = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=n_fft, win_length=win_length, hop_length=hop_length or n_fft // 4,
            f_min=f_min, f_max=f_max, n_mels=n_mels, power=2.0, norm=norm, mel_scale=mel_scale,
        )  # fmt: skip

    @property
    def sample_rate(self) -> int:
        return self.transform.sample_rate

    def resolved_options(self) -> dict[str, Any]:
        mel = self.transform
        return {"hop_length": mel.hop_length, "win_length": mel.win_length, "f_max": float(mel.mel_scale.f_max)}

    def features(self, x: Tensor) -> dict[str, Tensor]:
        power = _power_spectrogram(self.transform.spectrogram, x)
        mel = torch.matmul(power.transpose(-1, -2), self.transform.mel_scale.fb).transpose(-1, -2)  # as MelScale
        return {"mel": torch.log(mel + self.eps)}


@register_space("mrstft")
class MultiResolutionSTFT(AudioSpace):
    """Log-magnitude STFT at several resolutions: ``0.5 * log(|STFT|**2 + eps)``, one component per FFT size.

    Fine resolutions catch transients and timing, coarse ones pitch and harmonics. Components: ``waveform``
    (weight 0 by default) and ``stft{n_fft}`` for each resolution. Hann windows, centred, reflect-padded.

    Args:
        fft_sizes: FFT sizes (distinct), default 512, 1024, 2048.
        hop_sizes: hops, default ``n_fft // 4`` each.
        win_lengths: window lengths, default ``n_fft`` each.
        eps: added to the power inside the log.
        component_weights: overrides, e.g. ``{"stft512": 2.0}``.

    Example:
        >>> MultiResolutionSTFT().component_names
        ('waveform', 'stft512', 'stft1024', 'stft2048')
    """

    name = "mrstft"

    def __init__(
        self,
        fft_sizes: Sequence[int] = (512, 1024, 2048),
        hop_sizes: Sequence[int] | None = None,
        win_lengths: Sequence[int] | None = None,
        eps: float = 1e-5,
        component_weights: Mapping[str, float] | None = None,
    ) -> None:
        fft_sizes = list(fft_sizes)
        hop_sizes = list(hop_sizes) if hop_sizes is not None else [n // 4 for n in fft_sizes]
        win_lengths = list(win_lengths) if win_lengths is not None else list(fft_sizes)
        if (
            not fft_sizes
            or len(set(fft_sizes)) != len(fft_sizes)
            or not len(fft_sizes) == len(hop_sizes) == len(win_lengths)
        ):
            raise ValueError(
                f"fft_sizes, hop_sizes, win_lengths: expected equally long lists of distinct FFT sizes, got "
                f"{fft_sizes}, {hop_sizes}, {win_lengths}"
            )
        for n_fft, hop, win in zip(fft_sizes, hop_sizes, win_lengths, strict=True):
            _check_fft(n_fft, hop, win)
        super().__init__({f"stft{n}": 1.0 for n in fft_sizes}, raw_weight=0.0, component_weights=component_weights)
        self.eps = eps
        self.min_length = max(fft_sizes) // 2 + 1
        self.spectrograms = nn.ModuleList(
            torchaudio.transforms.Spectrogram(n_fft=n, hop_length=h, win_length=w, power=2.0)
            for n, h, w in zip(fft_sizes, hop_sizes, win_lengths, strict=True)
        )

    def resolved_options(self) -> dict[str, Any]:
        names = {"fft_sizes": "n_fft", "hop_sizes": "hop_length", "win_lengths": "win_length"}
        return {option: tuple(getattr(s, name) for s in self.spectrograms) for option, name in names.items()}

    def features(self, x: Tensor) -> dict[str, Tensor]:
        return {
            name: 0.5 * torch.log(_power_spectrogram(spectrogram, x) + self.eps)
            for name, spectrogram in zip(self.component_names[1:], self.spectrograms, strict=True)
        }


def _power_spectrogram(transform: torchaudio.transforms.Spectrogram, x: Tensor) -> Tensor:
    """``transform(x)`` for the spectrograms the spaces build (no pad, centred, reflect-padded, not normalised,
    one-sided, power 2): the same operations as torchaudio's, without its ``torch.jit.isinstance`` checks, which
    ``torch.compile`` cannot trace (tests compare the two bit for bit)."""
    frames = torch.stft(
        x.reshape(-1, x.shape[-1]), transform.n_fft, transform.hop_length, transform.win_length, transform.window,
        center=True, pad_mode="reflect", normalized=False, onesided=True, return_complex=True,
    )  # fmt: skip
    return frames.abs().pow(2.0).reshape(*x.shape[:-1], *frames.shape[-2:])


def _check_fft(n_fft: int, hop_length: int | None, win_length: int | None) -> None:
    for argument, value in (("n_fft", n_fft), ("hop_length", hop_length), ("win_length", win_length)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"{argument}: expected a positive integer, got {value!r}")
    if win_length is not None and win_length > n_fft:
        raise ValueError(f"win_length: expected at most n_fft = {n_fft}, got {win_length}")
