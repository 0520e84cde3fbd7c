"""ErrorProfile: where the error lives over a whole dataset, accumulated exactly like PerceptionMSE.

Images: the mean squared-error map pooled to a ``grid x grid`` picture (which regions fail), and radial power
spectra of the error, the target and the prediction, on the channel mean (which frequencies fail). A prediction
with *less* high frequency power than the target is blurry; one with *more* hallucinates texture or adds noise.
Audio: per mel band, the mean squared log-mel error and the mean mel power of target and prediction.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import checks
from .exact_metric import ExactSumMetric
from .precision import own_precision
from .spaces.audio import MelAnalysis, check_fft

MODALITIES = ("image", "audio")


class ErrorProfile(ExactSumMetric):
    """Dataset-wide error map and error-by-frequency profile; exact and one ``all_reduce`` per compute.

    Args:
        modality: ``"image"`` (``[N, C, H, W]``) or ``"audio"`` (``[N, T]`` or ``[N, C, T]``).
        data_range: value range of the inputs (``d`` or ``(min, max)``); integer inputs need it. The map and the
            spectra are in the data's own units (squared).
        grid: side of the pooled error map (images).
        bands: radial frequency bands from 0 to the corner frequency (images).
        sample_rate, n_fft, hop_length, n_mels: the mel analysis (audio; ``sample_rate`` is required).

    Example:
        >>> import torch
        >>> profile = ErrorProfile("image", grid=4, bands=8)
        >>> target = torch.rand(2, 3, 32, 32)
        >>> profile.update(target + 0.1 * torch.randn(2, 3, 32, 32), target)
        >>> profile.compute()["error_map"].shape
        torch.Size([4, 4])
    """

    def __init__(
        self,
        modality: str = "image",
        data_range: float | tuple[float, float] | None = None,
        grid: int = 32,
        bands: int = 32,
        sample_rate: int | None = None,
        n_fft: int = 1024,
        hop_length: int | None = None,
        n_mels: int = 64,
        **kwargs: Any,
    ) -> None:
        modality = checks.check_choice("modality", modality, MODALITIES)
        for argument, value, most in (("grid", grid, 256), ("bands", bands, 1024), ("n_mels", n_mels, 1024)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
                raise ValueError(
                    f"{argument}: expected an integer from 1 to {most} (the state holds 72 int64 per value: "
                    f"{most} keeps it below 40 MB), got {value!r}"
                )
        if modality == "audio":
            if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
                raise ValueError(f"sample_rate: the audio profile needs the sample rate in Hz, got {sample_rate!r}")
            check_fft(n_fft, hop_length, None)
        per_row = bands if modality == "image" else n_mels
        # the state's parts, in the order the per-sample values are concatenated (see _image/_audio_values)
        parts = {"error_map": (grid, grid)} if modality == "image" else {}
        parts.update({"error": (per_row,), "target": (per_row,), "preds": (per_row,)})
        super().__init__(num_sums=sum(math.prod(shape) for shape in parts.values()), num_counts=1, **kwargs)
        self.parts = parts
        self.modality, self.grid, self.bands, self.n_mels = modality, grid, bands, n_mels
        self.data_range = checks.check_data_range(data_range)
        self.sample_rate = sample_rate
        self.min_length = n_fft // 2 + 1
        self.n_fft, self.hop_length = n_fft, hop_length or n_fft // 4
        if modality == "audio":  # held outside the module tree: its buffers are no state
            self.__dict__["mel"] = MelAnalysis(sample_rate, n_fft, self.hop_length, n_mels=n_mels)

    def configuration(self) -> dict[str, str]:
        options = ("modality", "data_range", "grid", "bands", "sample_rate", "n_fft", "hop_length", "n_mels")
        return {**super().configuration(), **{name: repr(getattr(self, name)) for name in options}}

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Accumulate a batch (no gradients); samples with NaN/Inf are left out."""
        checks.check_tensor_pair(preds, target, self.data_range)
        checks.check_metric_device(preds, self.totals.device, type(self).__name__)
        allowed = (4,) if self.modality == "image" else (2, 3)
        layout = "images [N, C, H, W]" if self.modality == "image" else "audio [N, T] or [N, C, T]"
        checks.check_ndim(preds, allowed, layout, f"{self.modality} profile")
        if self.modality == "audio":
            checks.check_min_size(preds, self.min_length, "signals", "audio profile")
        if preds.shape[0] == 0:
            return
        # integer images in float64 (exact to 2**53: their differences too); audio through the float32 mel analysis
        dtype = torch.float64 if self.modality == "image" and not preds.is_floating_point() else torch.float32
        preds, target = preds.detach().to(dtype), target.detach().to(dtype)
        with own_precision(preds.device):
            values = (
                self._image_values(preds, target) if self.modality == "image" else self._audio_values(preds, target)
            )
        finite = values.sum(1, dtype=torch.float64).isfinite()  # a NaN/Inf input makes its row's sum non-finite
        if not bool(finite.all()):
            values = values[finite]
        if values.shape[0]:
            self._add(values.T, [values.shape[0]])  # float32: summed over the batch first where that is exact

    def compute(self) -> dict[str, Tensor]:
        """Mean over samples: ``error_map`` and spectra (images) or per-band profiles (audio), with frequencies."""
        return self.profile_of(self.totals)

    def profile_of(self, state: Tensor) -> dict[str, Tensor]:
        """:meth:`compute` of a state, e.g. one taken by :meth:`synced_state` (no collective: any rank or thread)."""
        samples = self._counts(state)[0]
        values = torch.tensor(self._sums([samples] * self._num_sums, state), dtype=torch.float64)
        sizes = [math.prod(shape) for shape in self.parts.values()]
        named = {name: part.view(shape) for (name, shape), part in
                 zip(self.parts.items(), values.split(sizes), strict=True)}  # fmt: skip
        if self.modality == "image":
            frequency = (torch.arange(self.bands, dtype=torch.float64) + 0.5) / self.bands * math.sqrt(0.5)
            return {**named, "frequency": frequency}
        hertz = self.mel.filters.fb
        centres = (hertz * torch.linspace(0, self.sample_rate / 2, hertz.shape[0])[:, None]).sum(0) / hertz.sum(0)
        return {**named, "frequency": centres.double()}

    def _image_values(self, preds: Tensor, target: Tensor) -> Tensor:
        count, _, height, width = preds.shape
        planes = self._scratch("planes", (3 * count, height, width), preds)  # channel means: error, target, preds
        difference = torch.sub(preds, target, out=self._scratch("difference", preds.shape, preds))
        for part, images in enumerate((difference, target, preds)):
            torch.mean(images, 1, out=planes[part * count : (part + 1) * count])
        squared = torch.mean(difference.square_(), 1, out=self._scratch("squared", (count, height, width), preds))
        error_map = torch.nn.functional.adaptive_avg_pool2d(squared, self.grid).flatten(1)
        spectra = _radial_bands(planes, self.bands, self._scratch).float().chunk(3)  # float32: see add_exact
        return torch.cat([error_map, *spectra], 1)

    def _scratch(self, name: str, shape: Sequence[int], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """A temporary of ``update``. On the CPU the same buffer serves every batch of one shape: there, fresh
        memory (page faults, cold caches after the model's forward) costs more than the arithmetic (measured 2.3-2.9
        -> 1.7-1.8 ms per 16 crops of 64x64 in a validation loop). Elsewhere a new tensor: the caching allocator
        recycles memory already."""
        if like.device.type != "cpu":
            return _new(name, shape, like, dtype)
        dtype = dtype or like.dtype
        buffers = self.__dict__.setdefault("_buffers_of_update", {})  # outside the module tree: no state
        buffer = buffers.get(name)
        if buffer is None or buffer.shape != tuple(shape) or buffer.dtype != dtype:
            with torch.inference_mode(False):  # a normal tensor may be written in and out of inference mode
                buffer = buffers[name] = torch.empty(shape, dtype=dtype)
        return buffer

    def __getstate__(self) -> dict[str, Any]:
        return {key: value for key, value in super().__getstate__().items() if key != "_buffers_of_update"}

    def _audio_values(self, preds: Tensor, target: Tensor) -> Tensor:
        mel = self.mel.to(preds.device)
        target_power, preds_power = mel(target), mel(preds)  # [N, (C,) M, frames]
        log_error = (torch.log(preds_power + 1e-5) - torch.log(target_power + 1e-5)).square()
        per_band = [x.transpose(-1, -2).reshape(x.shape[0], -1, self.n_mels).mean(1)
                    for x in (log_error, target_power, preds_power)]  # fmt: skip
        return torch.cat(per_band, 1)


Scratch = Callable[..., Tensor]


def _new(name: str, shape: Sequence[int], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


def radial_power(x: Tensor, bands: int) -> Tensor:
    """Mean power per radial frequency band of each image's channel mean ``[N, C, H, W] -> [N, bands]`` (float64).

    Band ``b`` covers radii ``[b, b + 1) / bands`` of the corner frequency ``sqrt(0.5)`` cycles per pixel; power
    is ``|FFT|**2 / (H * W)`` (orthonormal FFT of the half spectrum), averaged over the frequencies of a band.
    An image's values depend on that image only (no batched matrix product, whose rounding varies with the batch
    size, and no atomic scatter), so any batch split gives the same bits.

    Example:
        >>> import torch
        >>> flat = torch.ones(1, 1, 8, 8)
        >>> radial_power(flat, 4)[0, 1:].abs().max() < 1e-6  # a constant image has only the zero frequency
        tensor(True)
    """
    return _radial_bands(x.mean(1), bands)


def _radial_bands(planes: Tensor, bands: int, scratch: Scratch = _new) -> Tensor:
    """:func:`radial_power` of single-channel planes ``[N, H, W]``; ``scratch(name, shape, like, dtype)`` gives the
    temporaries."""
    rows, height, width = planes.shape
    half = (rows, height, width // 2 + 1)
    spectrum = torch.fft.rfft2(planes, norm="ortho", out=scratch("spectrum", half, planes, planes.dtype.to_complex()))
    power = torch.mul(spectrum.real, spectrum.real, out=scratch("power", half, planes))
    imaginary = torch.mul(spectrum.imag, spectrum.imag, out=scratch("imaginary", half, planes))
    power = power.add_(imaginary).flatten(1)  # [N, H * (W // 2 + 1)]; two roundings (addcmul fuses them on SIMD CPUs)
    order, last, before, before_exists, sizes = _band_layout(height, width, bands, planes.device)
    # Frequencies grouped by band, highest band first (where power is smallest), summed in a running float64 sum
    # along each row; a band's total is the running sum at its last frequency minus the one just before its first.
    ordered = torch.index_select(power, 1, order, out=scratch("ordered", power.shape, planes))
    running = torch.cumsum(ordered, 1, dtype=torch.float64, out=scratch("running", power.shape, planes, torch.float64))
    return (running.index_select(1, last) - running.index_select(1, before) * before_exists) / sizes


@functools.lru_cache(maxsize=16)
def _band_layout(height: int, width: int, bands: int, device: torch.device) -> tuple[Tensor, ...]:
    """The half spectrum's frequencies sorted by radial band, highest first; per band, the position of its last
    frequency and of the one just before its first in that order (with whether there is one), and its size."""
    band = radial_band_of_frequencies(height, width, bands).to(device)
    order = torch.argsort(-band, stable=True)
    counts = torch.bincount(band, minlength=bands)
    ends = counts.flip(0).cumsum(0).flip(0)  # the number of frequencies in bands >= b
    starts = ends - counts
    last = (ends - 1).clamp(min=0)  # an empty band reads the same position twice: a total of 0
    before = (starts - 1).clamp(min=0)
    before_exists = ((starts > 0) | (counts == 0)).double()
    return order, last, before, before_exists, counts.clamp(min=1).double()


def radial_band_of_frequencies(height: int, width: int, bands: int) -> Tensor:
    """The radial band of every frequency of the half spectrum (``[H * (W // 2 + 1)]`` int64, rfft2's order), in
    exact integer arithmetic: the same on every CPU and device.

    Frequency ``(ky / H, kx / W)`` (``ky`` signed as in ``fftfreq``) lies in band
    ``b = min(floor(sqrt((ky / H)**2 + (kx / W)**2) / sqrt(0.5) * bands), bands - 1)``. With ``H = g h``, ``W = g w``
    (``g = gcd(H, W)``) that is ``isqrt(floor(2 bands**2 (ky**2 w**2 + kx**2 h**2) / (g h w)**2))``, since
    ``floor(sqrt(q)) == isqrt(floor(q))``; a float formula puts the frequencies on a band edge (every diagonal
    ``ky == kx`` of a square image with an even number of bands) on either side, depending on the CPU's rounding.

    Example:
        >>> radial_band_of_frequencies(4, 4, 2).view(4, 3)
        tensor([[0, 0, 1],
                [0, 1, 1],
                [1, 1, 1],
                [0, 1, 1]])
    """
    g = math.gcd(height, width)
    h, w = height // g, width // g
    scale = 2 * bands * bands
    if scale * (h * w * g) ** 2 >= 1 << 62:  # the products below stay below that
        raise ValueError(
            f"bands: {bands} radial bands of {height}x{width} images exceed the exact band layout's int64 range; "
            f"use fewer bands or smaller images"
        )
    ky = torch.fft.fftfreq(height, 1 / height, dtype=torch.float64).round().long()  # 0, 1, ..., -1: exact integers
    kx = torch.arange(width // 2 + 1)
    squared = scale * ((ky * ky * (w * w))[:, None] + (kx * kx * (h * h))[None, :])
    quotient = torch.div(squared, (g * h * w) ** 2, rounding_mode="floor").flatten()
    band = quotient.double().sqrt().long()  # within 1 of isqrt(quotient), which the two steps below make exact
    band -= (band * band > quotient).long()
    band += ((band + 1) * (band + 1) <= quotient).long()
    return band.clamp_(max=bands - 1)
