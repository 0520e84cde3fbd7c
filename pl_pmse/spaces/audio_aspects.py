"""The ``audio-aspects`` space: timbre, pitch and rhythm, each an MSE in a differentiable, gain-invariant transform.

- ``timbre``: mel-cepstral coefficients ``c1 ... cK`` of each frame's log mel amplitude ``L_b = 0.5 * ln(mel power
  + floor)`` over its ``M`` bands, ``c_k = 2 / M * sum_b L_b cos(pi k (b + 1/2) / M)`` (so that ``L`` is about
  ``c0 / 2 + sum_k c_k cos(...)`` on the mel axis: the convention of the mel-cepstral distortion literature, SPTK's;
  torchaudio's ``MFCC(norm="ortho")`` is ``sqrt(M / 2)`` times larger, and of the log power): the spectral envelope,
  the quantity behind the mel-cepstral distortion (:class:`~pl_pmse.mcd.MelCepstralDistortion`). ``c0``, the
  frame's loudness, is left out.
- ``pitch``: each frame's pitch-class profile (chroma): the power in semitone bands from C2 (65.4 Hz) up to B7
  (3951 Hz; at lower sample rates the whole octaves whose B lies below the Nyquist frequency), triangular on the
  log-frequency axis, the octaves folded onto 12 classes, scaled to unit root-mean-square over the classes (frames
  more than 30 dB below the clip's loudest fade to zero).
- ``rhythm``: the onset-strength envelope, the mean over mel bands of the rise of the log mel power from one frame
  to the next, ``mean_b max(0, 2 L[b, t] - 2 L[b, t - 1])`` (spectral flux, as librosa's ``onset_strength``, in
  natural-log units of power), without the frames at the clip's ends whose window reaches past it.

A gain change registers in none of them: the log floor is ``floor_db`` below each frame's loudest mel band plus
``range_db`` below the clip's, so a gain adds one constant to every log (cancelled by the DCT's ``c1 ... cK`` and by
the frame differences) and scales a frame's pitch profile, which the normalisation removes. With the floor per frame
a loudness envelope (a tremolo) leaves ``timbre`` alone too: it shows in ``rhythm``; the clip's floor bounds the
rise out of digital silence (``range_db / 10 * ln(10)`` at most: 18.4 at 80 dB). The mel analysis is the ``mel``
space's (its filters the same on every machine; the FFT equal to float32 rounding across CPUs); the semitone bands run
through the same per-band filters, the DCT as one dot product per coefficient.
"""

from __future__ import annotations

import decimal
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .. import checks
from .audio import AudioSpace, BandFilters, MelAnalysis, _power_spectrogram, check_fft, constant_buffers
from .registry import register_space

PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
LOWEST_PITCH, OCTAVES = 36, 6  # MIDI note numbers: C2 (65.4 Hz) and six octaves, to B7 (3951 Hz)


CEPSTRUM_DEFAULTS = {
    "n_fft": 1024,
    "hop_length": None,
    "n_mels": 80,
    "n_cepstra": 24,
    "floor_db": 60.0,
    "range_db": 80.0,
}
PITCH_RANGE_DB = 30.0  # pitch profiles of frames more than this below the clip's loudest fade to zero


class MelCepstrum(nn.Module):
    """Log mel amplitude and mel-cepstral coefficients; the log floor: ``floor_db`` below each frame's peak band plus
    ``range_db`` below the clip's.

    ``log_mel(x)``: ``0.5 * ln(mel power + floor)``, ``[..., n_mels, frames]``; ``cepstrum(log_mel)``: ``c1 ... cK``,
    ``[..., frames, n_cepstra]`` (the DCT-II over the bands scaled by ``2 / n_mels``, see the module doc; without
    ``c0``). ``options``: the
    arguments, ``hop_length`` resolved.
    """

    def __init__(
        self,
        sample_rate: int,
        n_fft: int = 1024,
        hop_length: int | None = None,
        n_mels: int = 80,
        n_cepstra: int = 24,
        floor_db: float = 60.0,
        range_db: float = 80.0,
    ) -> None:
        super().__init__()
        check_fft(n_fft, hop_length, None)
        for argument, value, most in (("n_mels", n_mels, 512), ("n_cepstra", n_cepstra, n_mels - 1)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
                raise ValueError(f"{argument}: expected an integer from 1 to {most}, got {value!r}")
        for argument, value in (("floor_db", floor_db), ("range_db", range_db)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 300:
                raise ValueError(f"{argument}: expected dB below the peak in (0, 300), got {value!r}")
        self.mel = MelAnalysis(sample_rate, n_fft, hop_length, n_mels=n_mels)
        self.frame_floor, self.clip_floor = 10.0 ** (-floor_db / 10), 10.0 ** (-range_db / 10)  # of the peaks
        self.n_cepstra = n_cepstra
        self.options = {"sample_rate": sample_rate, "n_fft": n_fft, "hop_length": self.mel.hop_length,
                        "n_mels": n_mels, "n_cepstra": n_cepstra, "floor_db": float(floor_db),
                        "range_db": float(range_db)}  # fmt: skip
        dct = [[math.cos(math.pi / n_mels * (band + 0.5) * k) * 2.0 / n_mels for band in range(n_mels)]
               for k in range(1, n_cepstra + 1)]  # fmt: skip  # DCT-II, the cepstrum's scale (scalar libm: any machine)
        self.register_buffer("dct", torch.tensor(dct, dtype=torch.float32), persistent=False)

    def log_mel(self, x: Tensor) -> Tensor:
        power = self.mel(x)
        frame_peak = power.detach().amax(-2, keepdim=True)
        floor = self.frame_floor * frame_peak + self.clip_floor * frame_peak.amax(-1, keepdim=True)
        return 0.5 * torch.log(power + floor + torch.finfo(power.dtype).tiny)

    def cepstrum(self, log_mel: Tensor) -> Tensor:
        frames = log_mel.transpose(-1, -2)  # [..., frames, n_mels]
        dct = self.dct.to(frames.dtype)
        return torch.stack([torch.linalg.vecdot(frames, dct[k]) for k in range(self.n_cepstra)], -1)


def semitone_filters(n_freqs: int, sample_rate: int, octaves: int) -> Tensor:
    """Triangular filters on the log-frequency axis, one per semitone from C2, ``[n_freqs, 12 * octaves]``: band
    ``s`` rises from semitone ``s - 1`` to its centre and falls to ``s + 1``. The bins' pitches are computed in
    40-digit decimals (the same filters on every machine)."""
    nyquist = sample_rate / 2
    with decimal.localcontext() as context:
        context.prec = 40
        step = decimal.Decimal(nyquist) / (n_freqs - 1)
        ln2, a4 = decimal.Decimal(2).ln(), decimal.Decimal(440)
        pitch = [-math.inf] + [float(12 * (step * i / a4).ln() / ln2 + 69) for i in range(1, n_freqs)]
    pitch = torch.tensor(pitch, dtype=torch.float64)[:, None]  # MIDI number of each bin
    centres = LOWEST_PITCH + torch.arange(12 * octaves, dtype=torch.float64)
    fb = (1 - (pitch - centres).abs()).clamp(min=0)
    return fb.float()


def pitch_octaves(sample_rate: int) -> int:
    """The whole octaves from C2 whose top semitone (B) lies below the Nyquist frequency (at most six)."""
    for octaves in range(OCTAVES, 0, -1):
        top = 440 * 2 ** ((LOWEST_PITCH + 12 * octaves - 1 - 69) / 12)  # the octave's B
        if top <= sample_rate / 2:
            return octaves
    raise ValueError(f"sample_rate: audio-aspects' pitch needs at least 124 Hz of bandwidth, got {sample_rate} Hz")


@register_space("audio-aspects")
class AudioAspects(AudioSpace):
    """Perception MSE by audible quality: ``timbre``, ``pitch`` and ``rhythm`` (see the module doc); ``waveform`` at
    weight 0.

    Args:
        sample_rate: of the audio in Hz (required).
        n_fft, hop_length, n_mels: the mel analysis of ``timbre`` and ``rhythm`` (``hop_length`` defaults to
            ``n_fft // 4``; ``pitch`` uses the same hop, so every component has the same frames).
        n_cepstra: mel-cepstral coefficients of ``timbre`` (``c1 ... cK``; 24 is usual for the mel-cepstral
            distortion).
        pitch_n_fft: the FFT of the pitch profile; default the smallest power of two of at least a quarter second
            (4096 at 16 kHz: 3.9 Hz bins, 1.0 semitone at C2).
        floor_db, range_db: the log floor of ``timbre`` and ``rhythm``: ``floor_db`` below each frame's loudest mel
            band plus ``range_db`` below the clip's. (``pitch``: the profiles of frames more than 30 dB below the
            clip's loudest fade to zero.)
        component_weights: ``{component: weight}`` overrides.

    Example:
        >>> import torch
        >>> space = AudioAspects(sample_rate=16000)
        >>> {name: tuple(f.shape) for name, f in space.features(torch.zeros(2, 16000)).items()}
        {'timbre': (2, 63, 24), 'pitch': (2, 63, 12), 'rhythm': (2, 58)}
    """

    name = "audio-aspects"

    def __init__(
        self,
        sample_rate: int | None = None,
        n_fft: int = 1024,
        hop_length: int | None = None,
        n_mels: int = 80,
        n_cepstra: int = 24,
        pitch_n_fft: int | None = None,
        floor_db: float = 60.0,
        range_db: float = 80.0,
        component_weights: Mapping[str, float] | None = None,
    ) -> None:
        checks.check_sample_rate(sample_rate, "space 'audio-aspects'")
        if pitch_n_fft is None:
            pitch_n_fft = 2 ** math.ceil(math.log2(sample_rate / 4))
        check_fft(pitch_n_fft, None, None)
        octaves = pitch_octaves(sample_rate)
        cepstrum = MelCepstrum(sample_rate, n_fft, hop_length, n_mels, n_cepstra, floor_db, range_db)  # checks them
        super().__init__(
            {"timbre": 1.0, "pitch": 1.0, "rhythm": 1.0}, raw_weight=0.0, component_weights=component_weights
        )
        self.cepstrum = cepstrum
        self.hop_length = self.cepstrum.mel.hop_length
        from torchaudio.transforms import Spectrogram  # loaded on first use

        spectrogram = Spectrogram(n_fft=pitch_n_fft, hop_length=self.hop_length, power=2.0)
        self.pitch_spectrogram = constant_buffers(spectrogram, "window")
        self.semitones = BandFilters(semitone_filters(pitch_n_fft // 2 + 1, sample_rate, octaves))
        self.edge_frames = math.ceil(n_fft // 2 / self.hop_length)
        self.min_length = max(max(n_fft, pitch_n_fft) // 2 + 1, self.hop_length * (2 * self.edge_frames + 1))
        self._sample_rate = sample_rate

    @property
    def sample_rate(self) -> int:
        return self._sample_rate

    def resolved_options(self) -> dict[str, Any]:
        return {"hop_length": self.hop_length, "pitch_n_fft": self.pitch_spectrogram.n_fft}

    def pitch_profile(self, x: Tensor) -> Tensor:
        """Each frame's pitch-class profile, ``[..., frames, 12]`` (C first), unit root-mean-square."""
        bands = self.semitones(_power_spectrogram(self.pitch_spectrogram, x))  # [..., 12 * octaves, frames]
        classes = bands.unflatten(-2, (-1, 12)).sum(-3).transpose(-1, -2)  # octaves folded: [..., frames, 12]
        peak = classes.detach().amax((-2, -1), keepdim=True)
        classes = classes / torch.where(peak > 0, peak, 1.0)  # the clip's peak 1: no underflow below
        mean_square = classes.square().mean(-1, keepdim=True)
        floor = 10.0 ** (-2 * PITCH_RANGE_DB / 10) * mean_square.detach().amax(-2, keepdim=True)  # of power**2
        norm = mean_square + floor
        return classes * torch.rsqrt(torch.where(norm > 0, norm, 1.0))  # silence: a zero profile, a finite gradient

    def onset_strength(self, log_mel: Tensor) -> Tensor:
        """The onset-strength envelope of a log mel amplitude ``[..., n_mels, frames]``: the mean over bands of the
        rise in log power into each frame, ``[..., frames - 1 - 2 * edge]``: the ``edge`` frames at each end whose
        window reaches past the clip are left out (the centred STFT pads them by reflection, a click)."""
        rises = (2 * log_mel.diff(dim=-1)).clamp(min=0).mean(-2)
        return rises[..., self.edge_frames : rises.shape[-1] - self.edge_frames]

    def views(self, x: Tensor) -> dict[str, Tensor]:
        """The pitch-class profile (``[N, 12, frames]``, C at the bottom) and the onset-strength envelope (``[N,
        frames]``, the rise into each frame; zero in the edge frames left out) of each sample's channel mean."""
        mono = x.mean(1) if x.dim() == 3 else x
        onsets = self.onset_strength(self.cepstrum.log_mel(mono))  # on the frame grid: zero where left out
        onsets = nn.functional.pad(onsets, (self.edge_frames + 1, self.edge_frames))
        return {"pitch class (C to B, bottom to top)": self.pitch_profile(mono).transpose(-1, -2),
                "onset strength": onsets}  # fmt: skip

    def features(self, x: Tensor) -> dict[str, Tensor]:
        log_mel = self.cepstrum.log_mel(x)
        return {
            "timbre": self.cepstrum.cepstrum(log_mel),
            "pitch": self.pitch_profile(x),
            "rhythm": self.onset_strength(log_mel),
        }
