"""The image profile: the squared-error map pooled to a ``grid x grid`` picture (which regions fail), and radial power
spectra of the error, the target and the prediction on the channel mean (which frequencies fail). A prediction
with *less* high frequency power than the target is blurry; one with *more* hallucinates texture or adds noise.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .base import ANALYSES, Analysis, Scratch, new_tensor

MOST = {"grid": 256, "bands": 1024}  # the state holds 72 int64 per value: these keep it below 40 MB


class ImageAnalysis(Analysis):
    """Per image: the pooled squared-error map (``grid x grid``) and ``bands`` radial bands of the power spectra
    of the error, the target and the prediction (channel means)."""

    layout = "images [N, C, H, W]"
    allowed_ndim = (4,)

    def __init__(self, grid: int = 32, bands: int = 32) -> None:
        for argument, value in (("grid", grid), ("bands", bands)):
            check_count(argument, value, MOST[argument])
        self.grid, self.bands = grid, bands
        self.options = {"grid": grid, "bands": bands}
        self.parts = {"error_map": (grid, grid), "error": (bands,), "target": (bands,), "preds": (bands,)}

    def dtype(self, x: Tensor) -> torch.dtype:
        return torch.float32 if x.is_floating_point() else torch.float64  # integers: exact to 2**53, differences too

    def values(self, preds: Tensor, target: Tensor, scratch: Scratch) -> Tensor:
        count, _, height, width = preds.shape
        planes = scratch("planes", (3 * count, height, width), preds)  # channel means: error, target, preds
        difference = torch.sub(preds, target, out=scratch("difference", preds.shape, preds))
        for part, images in enumerate((difference, target, preds)):
            torch.mean(images, 1, out=planes[part * count : (part + 1) * count])
        squared = torch.mean(difference.square_(), 1, out=scratch("squared", (count, height, width), preds))
        error_map = torch.nn.functional.adaptive_avg_pool2d(squared, self.grid).flatten(1)
        spectra = _radial_bands(planes, self.bands, scratch).float().chunk(3)  # float32: see add_exact
        return torch.cat([error_map, *spectra], 1)

    def frequency(self) -> Tensor:
        """Band centres in cycles per pixel, from 0 to the corner frequency ``sqrt(0.5)``."""
        return (torch.arange(self.bands, dtype=torch.float64) + 0.5) / self.bands * math.sqrt(0.5)


ANALYSES["image"] = ImageAnalysis


def check_count(argument: str, value: object, most: int) -> None:
    """A profile size: an integer from 1 to ``most``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise ValueError(
            f"{argument}: expected an integer from 1 to {most} (the state holds 72 int64 per value: {most} keeps it "
            f"below 40 MB), got {value!r}"
        )


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


def _radial_bands(planes: Tensor, bands: int, scratch: Scratch = new_tensor) -> Tensor:
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
