"""Audio spaces: the raw waveform, log-mel and multi-resolution log-STFT (torchaudio transforms)."""

from __future__ import annotations

import decimal
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import checks
from ..versions import require
from .base import Space
from .registry import register_space

if TYPE_CHECKING:
    from torchaudio.transforms import Spectrogram


class AudioSpace(Space):
    """Audio batches: mono ``[N, T]`` or multichannel ``[N, C, T]``, float in [-1, 1] by default."""

    raw_name = "waveform"
    modality = "audio"
    expected_range = (-1.0, 1.0)
    layout = "audio [N, T] or [N, C, T]"
    allowed_ndim = (2, 3)
    min_length = 1
    length_dims = "signals (samples along the last dimension)"  # what min_length counts, for the message
    range_hint = "e.g. data_range=(-32768, 32767) for 16-bit audio"

    def layout_hint(self, x: Tensor) -> str:
        if x.dim() == 3 and x.shape[-1] <= 8 < x.shape[1]:
            return f"; shape {tuple(x.shape)} looks like [N, T, C]: pass x.transpose(1, 2) for [N, C, T]"
        return ""

    def check_input(self, x: Tensor) -> None:
        super().check_input(x)
        checks.check_min_size(x, self.min_length, self.length_dims, self.name)


@register_space("waveform")
class WaveformSpace(AudioSpace):
    """The raw waveform: Perception MSE here is the sample-wise MSE.

    Example:
        >>> WaveformSpace().component_names
        ('waveform',)
    """

    name = "waveform"
    exact_features = True

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
        checks.check_sample_rate(sample_rate, "space 'mel'")
        check_fft(n_fft, hop_length, win_length)
        if f_max is not None and not f_min < f_max <= sample_rate / 2:
            raise ValueError(f"f_max: expected f_min < f_max <= sample_rate / 2 = {sample_rate / 2}, got {f_max}")
        super().__init__({"mel": 1.0}, raw_weight=0.0, component_weights=component_weights)
        self.eps = eps
        self.min_length = n_fft // 2 + 1
        self.analysis = MelAnalysis(sample_rate, n_fft, hop_length, win_length, n_mels, f_min, f_max, norm, mel_scale)
        self._register_load_state_dict_pre_hook(_drop_constants_saved_by_0_1)

    @property
    def sample_rate(self) -> int:
        return self.analysis.sample_rate

    def profile_options(self) -> dict[str, Any]:
        mel = self.analysis
        return {"n_fft": mel.n_fft, "hop_length": mel.hop_length, "n_mels": mel.n_mels}

    def resolved_options(self) -> dict[str, Any]:
        spectrogram = self.analysis.spectrogram
        return {"hop_length": spectrogram.hop_length, "win_length": spectrogram.win_length,
                "f_max": self.analysis.filters.f_max}  # fmt: skip

    def features(self, x: Tensor) -> dict[str, Tensor]:
        return {"mel": torch.log(self.analysis(x) + self.eps)}


def constant_buffers(module: nn.Module, *names: str) -> nn.Module:
    """``module`` (a torchaudio transform) with its buffers ``names`` made constants of its options: they move with
    it, but are in no ``state_dict`` of a model that holds the space."""
    for name in names:
        value = getattr(module, name)
        delattr(module, name)
        module.register_buffer(name, value, persistent=False)
    return module


def _drop_constants_saved_by_0_1(state_dict: dict, prefix: str, *args: Any) -> None:
    """0.1 saved the window and the filter bank of its torchaudio ``MelSpectrogram`` (``transform.*``) with a model
    holding the space; they are constants of the options, saved no more: a checkpoint of 0.1 still loads strictly."""
    for key in [key for key in state_dict if key.startswith(prefix + "transform.")]:
        del state_dict[key]


class MelAnalysis(nn.Module):
    """Mel power spectrogram ``[..., T] -> [..., n_mels, frames]``: torchaudio's ``MelSpectrogram`` (centred,
    reflect-padded Hann-windowed STFT, power 2, triangular filters), the same bits on every CPU that runs the same
    kernels; across CPUs equal to the FFT's float32 rounding (torch's CPU FFT is MKL's, whose code path differs
    between Intel and AMD processors: README, "What is the same where").

    The STFT and the power are torchaudio's own operations (bit-identical to its ``Spectrogram``). The filters differ
    in two ways that change values at float32 rounding only (tested against torchaudio): their float32 steps are done
    alike on every machine (:func:`mel_filter_bank`; torchaudio's vectorised ``10 ** x`` rounds by the CPU's vector
    instructions), and they are applied by a sum over each band's own frequencies instead of a matrix product (a BLAS
    library chooses its summation order by CPU: MKL's differs between Intel and AMD processors).

    Example:
        >>> analysis = MelAnalysis(16000, n_fft=512, n_mels=40)
        >>> analysis(torch.zeros(2, 16000)).shape
        torch.Size([2, 40, 126])
    """

    def __init__(
        self,
        sample_rate: int,
        n_fft: int = 1024,
        hop_length: int | None = None,
        win_length: int | None = None,
        n_mels: int = 80,
        f_min: float = 0.0,
        f_max: float | None = None,
        norm: str | None = None,
        mel_scale: str = "htk",
    ) -> None:
        super().__init__()
        frequencies = n_fft // 2 + 1
        if isinstance(n_mels, bool) or not isinstance(n_mels, int) or not 1 <= n_mels <= frequencies:
            raise ValueError(f"n_mels: expected an integer from 1 to n_fft // 2 + 1 = {frequencies}, got {n_mels!r}")
        self.sample_rate, self.n_fft, self.n_mels = sample_rate, n_fft, n_mels
        require("torchaudio")  # loaded on first use: import pl_pmse stays light
        from torchaudio.transforms import Spectrogram

        spectrogram = Spectrogram(n_fft=n_fft, win_length=win_length, hop_length=hop_length or n_fft // 4, power=2.0)
        self.spectrogram = constant_buffers(spectrogram, "window")  # as the filters
        self.filters = MelFilterBank(n_fft // 2 + 1, f_min, f_max, n_mels, sample_rate, norm, mel_scale)

    @property
    def hop_length(self) -> int:
        return self.spectrogram.hop_length

    def forward(self, x: Tensor) -> Tensor:
        return self.filters(_power_spectrogram(self.spectrogram, x))


class BandFilters(nn.Module):
    """Contiguous band filters ``[..., n_freqs, frames] -> [..., bands, frames]`` given as a dense ``fb``
    (``[n_freqs, bands]``, each band non-zero on one run of neighbouring frequencies), applied as a dot product over
    each band's own window of frequencies: per group of neighbouring bands (similar widths), a strided view, one
    gather of the windows and one ``vecdot`` (torch's own reduction: the same order on every x86 CPU, and a fixed
    number of operations on any device; MKL's matrix product orders its sums by CPU). The gradient
    (:class:`_BandGradient`) adds each band's windows back into its frequencies on a CPU and is the dense product
    ``fb @ grad`` on accelerators; ``fb`` is kept for it, for plots and for references.
    """

    GROUPS = 4  # more groups waste less of the windows on narrow bands, at 3 operations each

    def __init__(self, fb: Tensor) -> None:
        super().__init__()
        n_freqs, n_bands = fb.shape
        used = fb > 0
        widths = used.sum(0).clamp(min=1)  # bands are contiguous: each lies in a window of its width
        first = torch.where(used.any(0), used.int().argmax(0), 0)  # each band's lowest frequency bin
        self.register_buffer("fb", fb, persistent=False)
        self.groups = 0
        for bands in torch.arange(n_bands).tensor_split(min(self.GROUPS, n_bands)):  # neighbours: similar widths
            width = int(widths[bands].max())
            start = first[bands].clamp(max=max(n_freqs - width, 0))  # a top band's window ends at the last bin
            self.register_buffer(f"start{self.groups}", start, persistent=False)
            weight = fb.T[bands].gather(1, start[:, None] + torch.arange(width))
            self.register_buffer(f"weight{self.groups}", weight, persistent=False)
            self.groups += 1

    def forward(self, power: Tensor) -> Tensor:
        tracked = power.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()
        return _BandGradient.apply(power, self) if tracked else self.per_band(power)

    def per_band(self, power: Tensor) -> Tensor:
        """The filters applied band by band (see the class docstring)."""
        frequencies_last = power.transpose(-1, -2)  # [..., frames, n_freqs] (torch.stft's memory order)
        bands = []
        for group in range(self.groups):
            start, weight = getattr(self, f"start{group}"), getattr(self, f"weight{group}").to(power.dtype)
            windows = frequencies_last.unfold(-1, weight.shape[1], 1).index_select(-2, start)  # [..., bands, width]
            bands.append(torch.linalg.vecdot(windows, weight))
        return torch.cat(bands, -1).transpose(-1, -2)


class MelFilterBank(BandFilters):
    """torchaudio's triangular mel filters (:func:`mel_filter_bank`) as :class:`BandFilters`."""

    def __init__(
        self,
        n_freqs: int,
        f_min: float,
        f_max: float | None,
        n_mels: int,
        sample_rate: int,
        norm: str | None = None,
        mel_scale: str = "htk",
    ) -> None:
        top = float(f_max if f_max is not None else sample_rate // 2)
        super().__init__(mel_filter_bank(n_freqs, f_min, top, n_mels, sample_rate, norm, mel_scale))
        self.f_max = top


class _BandGradient(torch.autograd.Function):
    """:meth:`BandFilters.per_band` with its gradient written out. On a CPU each band's windows are added back into
    their frequencies by ``index_add`` (sequential: the same bits every run; autograd's own gradient of the strided
    view would first fill a zero tensor of every window of every frequency). On an accelerator ``index_select``'s
    backward adds atomically (run-to-run different bits); the dense product ``fb @ grad`` does not."""

    @staticmethod
    def forward(power: Tensor, filters: BandFilters) -> Tensor:
        return filters.per_band(power)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, BandFilters], output: Tensor) -> None:
        ctx.filters, ctx.n_freqs = inputs[1], inputs[0].shape[-2]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        if grad.device.type != "cpu":
            return torch.matmul(ctx.filters.fb.to(grad.dtype), grad), None  # [n_freqs, bands] @ [..., bands, frames]
        return _BandGradient.windowed(ctx.filters, grad, ctx.n_freqs), None

    @staticmethod
    def windowed(filters: BandFilters, grad: Tensor, n_freqs: int) -> Tensor:
        """The CPU gradient: each band's windows, weighted by ``grad``, added into their frequencies."""
        bands_last = grad.transpose(-1, -2)  # [..., frames, bands]
        result = bands_last.new_zeros(*bands_last.shape[:-1], n_freqs)
        first = 0
        for group in range(filters.groups):
            start, weight = getattr(filters, f"start{group}"), getattr(filters, f"weight{group}").to(grad.dtype)
            count, width = weight.shape
            windows = bands_last[..., first : first + count, None] * weight  # [..., frames, bands, width]
            positions = (start[:, None] + torch.arange(width, device=start.device)).flatten()
            result.index_add_(-1, positions, windows.flatten(-2))
            first += count
        return result.transpose(-1, -2)


def mel_filter_bank(
    n_freqs: int,
    f_min: float,
    f_max: float,
    n_mels: int,
    sample_rate: int,
    norm: str | None = None,
    mel_scale: str = "htk",
) -> Tensor:
    """``torchaudio.functional.melscale_fbanks`` (same arguments, float32 ``[n_freqs, n_mels]``) with each of its
    float32 steps done the same way on every machine: its ``linspace`` by the scalar formula (torch's vectorised one
    rounds by the CPU's vector width), its ``10 ** x`` and ``exp`` rounded from 40-digit decimal arithmetic
    (a software computation; torch's vectorised float32 ``pow`` rounds by CPU), the rest single IEEE operations.
    Equal to torchaudio's where its ``pow`` rounds correctly (nearly every entry; tested).

    Example:
        >>> import torchaudio
        >>> fb = mel_filter_bank(257, 0.0, 8000.0, 40, 16000)
        >>> bool((fb - torchaudio.functional.melscale_fbanks(257, 0.0, 8000.0, 40, 16000)).abs().max() < 1e-5)
        True
    """
    if norm is not None and norm != "slaney":
        raise ValueError(f"norm: expected None or 'slaney', got {norm!r}")
    checks.check_choice("mel_scale", mel_scale, ("htk", "slaney"))
    frequencies = _linspace(0.0, float(sample_rate // 2), n_freqs)
    with decimal.localcontext() as context:
        context.prec = 40
        low, high = (float(_hz_to_mel(decimal.Decimal(float(f)), mel_scale)) for f in (f_min, f_max))
        corners = torch.tensor([_mel_to_hz(m, mel_scale) for m in _linspace(low, high, n_mels + 2)])
    spacing = corners[1:] - corners[:-1]  # torchaudio's _create_triangular_filterbank, in float32
    slopes = corners[None, :] - torch.tensor(frequencies)[:, None]
    down, up = (-1.0 * slopes[:, :-2]) / spacing[:-1], slopes[:, 2:] / spacing[1:]
    fb = torch.clamp(torch.minimum(down, up), min=0.0)
    if norm == "slaney":
        fb *= (2.0 / (corners[2 : n_mels + 2] - corners[:n_mels]))[None, :]
    if bool((fb.amax(0) == 0).any()):
        warnings.warn(
            f"At least one mel filter has all zero values: n_mels ({n_mels}) may be too high for n_freqs ({n_freqs})",
            UserWarning,
            stacklevel=2,
        )
    return fb


def _linspace(start: float, end: float, steps: int) -> list[float]:
    """``torch.linspace(start, end, steps)`` in float32 by its scalar formula (as float32 numbers)."""
    f32 = np.float32
    first, last = f32(start), f32(end)
    step = (last - first) / f32(max(steps - 1, 1))
    half = steps // 2
    return [float(first + step * f32(i) if i < half else last - step * f32(steps - i - 1)) for i in range(steps)]


_SLANEY_STEP = 200 / decimal.Decimal(3)  # Hz per mel below 1 kHz
_SLANEY_LOG_STEP = decimal.Decimal("6.4").ln() / 27


def _hz_to_mel(hertz: decimal.Decimal, mel_scale: str) -> decimal.Decimal:
    """torchaudio's ``_hz_to_mel`` (in float64 there) in decimal arithmetic."""
    if mel_scale == "htk":
        return 2595 * (1 + hertz / 700).log10()
    if hertz < 1000:
        return hertz / _SLANEY_STEP
    return 1000 / _SLANEY_STEP + (hertz / 1000).ln() / _SLANEY_LOG_STEP


def _mel_to_hz(mel: float, mel_scale: str) -> float:
    """torchaudio's ``_mel_to_hz`` on a float32 ``mel``, in float32 steps; its ``10 ** x`` or ``exp`` in decimals."""
    f32 = np.float32
    mel = f32(mel)
    if mel_scale == "htk":  # 700 * (10 ** (mel / 2595) - 1)
        power = f32(float((decimal.Decimal(float(mel / f32(2595.0))) * decimal.Decimal(10).ln()).exp()))
        return float(f32(700.0) * (power - f32(1.0)))
    step, log_step = f32(200.0 / 3), f32(math.log(6.4) / 27.0)
    min_log_mel = f32(1000.0 / (200.0 / 3))  # torchaudio: a float64 scalar, applied in float32
    if mel < min_log_mel:
        return float(step * mel)
    exponent = log_step * (mel - min_log_mel)
    return float(f32(1000.0) * f32(float(decimal.Decimal(float(exponent)).exp())))


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
            check_fft(n_fft, hop, win)
        super().__init__({f"stft{n}": 1.0 for n in fft_sizes}, raw_weight=0.0, component_weights=component_weights)
        self.eps = eps
        self.min_length = max(fft_sizes) // 2 + 1
        require("torchaudio")
        from torchaudio.transforms import Spectrogram

        self.spectrograms = nn.ModuleList(
            Spectrogram(n_fft=n, hop_length=h, win_length=w, power=2.0)
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


def _power_spectrogram(transform: Spectrogram, x: Tensor) -> Tensor:
    """``transform(x)`` for the spectrograms the spaces build (no pad, centred, reflect-padded, not normalised,
    one-sided, power 2): the same operations as torchaudio's, without its ``torch.jit.isinstance`` checks, which
    ``torch.compile`` cannot trace (tests compare the two bit for bit)."""
    frames = torch.stft(
        x.reshape(-1, x.shape[-1]), transform.n_fft, transform.hop_length, transform.win_length, transform.window,
        center=True, pad_mode="reflect", normalized=False, onesided=True, return_complex=True,
    )  # fmt: skip
    return frames.abs().pow(2.0).reshape(*x.shape[:-1], *frames.shape[-2:])


MAX_N_FFT = 1 << 16


def check_fft(n_fft: int, hop_length: int | None, win_length: int | None) -> None:
    """The STFT's sizes: positive integers, the window no longer than the FFT, at least 2 frequencies."""
    for argument, value in (("n_fft", n_fft), ("hop_length", hop_length), ("win_length", win_length)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"{argument}: expected a positive integer, got {value!r}")
    if not 2 <= n_fft <= MAX_N_FFT:
        raise ValueError(
            f"n_fft: expected 2 (one frequency besides 0) to {MAX_N_FFT} (4 s at 16 kHz: a longer window is a "
            f"spectrum of the whole clip, and its frames would take gigabytes), got {n_fft}"
        )
    if win_length is not None and win_length > n_fft:
        raise ValueError(f"win_length: expected at most n_fft = {n_fft}, got {win_length}")
