"""ImageFidelity: SSIM and sharpness over a whole image set, beside Perception MSE, accumulated exactly.

- **SSIM** is torchmetrics' ``StructuralSimilarityIndexMeasure(data_range=...)`` with its defaults (Gaussian window of
  11 taps, sigma 1.5, reflect padding, ``k1=0.01``, ``k2=0.03``; the mean of each image's SSIM map, averaged over the
  images). The window runs as weighted sums of shifted views (separable: rows, then columns) and each image's map is
  summed in float64 along one row: an image's value never depends on its batch, its device's reduction order or the
  number of threads. Equal to torchmetrics' to float32 rounding.
- **Sharpness** is the power of the prediction over that of the target at radial frequencies of at least ``cutoff``
  (0.25 cycles per pixel: the upper half of the spectrum's radius) of each image's channel mean, summed over the set:
  below 1 the model blurs (the blur caveat of minimising an MSE), above 1 it adds noise or invented detail. Power is
  ``|FFT|**2`` of the orthonormal 2-D FFT, every frequency counted once (the half spectrum's mirrored columns twice).

Both are sums over images of per-image values, kept in the exact accumulators of :mod:`pl_pmse.exact` (SSIM, which
can be negative, as its positive and negative parts): the same bits for any batch split, update order or number of
processes, and one ``all_reduce`` per compute.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from . import checks, reduction
from .exact import NUM_BINS, exact_sums
from .exact_metric import TORCHMETRICS_OPTIONS, SampleFiguresMetric
from .precision import own_precision
from .spaces.image import BLOCK_ELEMENTS

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03  # torchmetrics' (and Wang et al.'s) defaults
# data ranges measured as given (the bits of torchmetrics' SSIM); wider or narrower ones are scaled to span 1 first
SAFE_SPANS = (1e-12, 1e12)
SHARPNESS_CUTOFF = 0.25  # cycles per pixel
# pixels per side: SSIM's reflect padding of 5 pixels needs 6; fewer than 8 leave sharpness a handful of frequencies
MIN_SIZES = {"ssim": SSIM_WINDOW // 2 + 1, "sharpness": 8}
_FFT_CHUNK = 8  # images per FFT on accelerators: one plan shape whatever the batch, so the same bits per image
FIGURES = ("ssim", "sharpness")


class ImageFidelity(SampleFiguresMetric):
    """SSIM and sharpness of predicted images against their targets, over the whole set (see the module doc).

    Args:
        data_range: the images' value range, as in torchmetrics' SSIM: ``d`` (the range is ``d``, no clamping) or
            ``(min, max)`` (both images clamped to it). Needed for SSIM (its constants are ``(k * range) ** 2``).
        ssim, sharpness: measure each (at least one).
        cutoff: the lower edge of the sharpness band in cycles per pixel, in ``(0, 0.5]``.
        options: ``torchmetrics.Metric``'s keyword options.

    Example:
        >>> import torch
        >>> fidelity = ImageFidelity(data_range=1.0)
        >>> target = torch.rand(4, 3, 32, 32, generator=torch.manual_seed(0))
        >>> fidelity.update(target.clamp(0.2, 0.8), target)
        >>> {name: round(value.item(), 3) for name, value in fidelity.compute().items()}
        {'ssim': 0.961, 'sharpness': 0.643}
    """

    def __init__(
        self,
        data_range: float | tuple[float, float] | None = 1.0,
        ssim: bool = True,
        sharpness: bool = True,
        cutoff: float = SHARPNESS_CUTOFF,
        nan_strategy: str = "error",
        **options: Any,
    ) -> None:
        unknown = sorted(set(options) - set(TORCHMETRICS_OPTIONS))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not an option of ImageFidelity")
        for argument, value in (("ssim", ssim), ("sharpness", sharpness)):
            if not isinstance(value, bool):
                raise TypeError(f"{argument}: expected True or False, got {value!r}")
        if not (ssim or sharpness):
            raise ValueError("ssim and sharpness: expected at least one of them True")
        if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float)) or not 0 < cutoff <= 0.5:
            raise ValueError(f"cutoff: expected cycles per pixel in (0, 0.5], got {cutoff!r}")
        bounds = checks.check_data_range(data_range)
        if ssim and bounds is None:
            raise ValueError("data_range: SSIM needs the images' range (e.g. data_range=1.0 or data_range=255)")
        # sums: SSIM's positive and negative parts, the prediction's and the target's power above the cutoff
        super().__init__(4, nan_strategy, **options)
        self.data_range, self.clamps = bounds, isinstance(data_range, (tuple, list))
        self.figures = tuple(name for name, on in zip(FIGURES, (ssim, sharpness), strict=True) if on)
        self.cutoff = float(cutoff)
        self._add_configuration_checksum()

    def configuration(self) -> dict[str, str]:
        options = {"data_range": self.data_range, "clamps": self.clamps, "figures": self.figures, "cutoff": self.cutoff}
        return {**super().configuration(), **{name: repr(value) for name, value in options.items()}}

    @property
    def requirement(self) -> str:
        """What :meth:`fits` asks of a batch, for messages."""
        return f"images [N, C, H, W] of at least {max(MIN_SIZES[name] for name in self.figures)} pixels a side"

    def fits(self, x: Tensor) -> bool:
        """Whether a batch of this shape can be measured (the callback leaves other batches out, with a warning)."""
        return x.dim() == 4 and all(min(x.shape[-2:]) >= MIN_SIZES[name] for name in self.figures)

    def check(self, preds: Tensor, target: Tensor) -> None:
        """Raise on a pair that cannot be measured, naming what was expected."""
        checks.check_tensor_pair(preds, target, self.data_range)
        checks.check_ndim(preds, (4,), "images [N, C, H, W]", "ImageFidelity")
        for name in self.figures:
            minimum = MIN_SIZES[name]
            if min(preds.shape[-2:]) < minimum:
                raise ValueError(
                    f"{name}: needs images of at least {minimum}x{minimum} pixels, got {tuple(preds.shape[-2:])} "
                    f"(turn it off with {name}=False)"
                )

    def sample_values(self, preds: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Each image's values, float64 ``[N]``: ``ssim``, and ``preds_power`` / ``target_power`` above the cutoff
        (sharpness of one image: their ratio). No checks (see :meth:`check`), no gradients."""
        dtype = torch.float64 if preds.dtype == torch.float64 else torch.float32
        preds, target = preds.detach().to(dtype), target.detach().to(dtype)
        data_range = self.data_range
        if data_range is not None and not SAFE_SPANS[0] <= data_range[1] - data_range[0] <= SAFE_SPANS[1]:
            # SSIM and sharpness do not change when the data and the range are scaled together: measured at span 1,
            # where neither SSIM's constants (k * span) ** 2 nor the squares and powers overflow or vanish
            span = data_range[1] - data_range[0]
            preds, target, data_range = preds / span, target / span, (data_range[0] / span, data_range[1] / span)
        with own_precision(preds.device, inner_products=False):
            values = {}
            if "ssim" in self.figures:
                values["ssim"] = ssim_per_image(preds, target, data_range, self.clamps)
            if "sharpness" in self.figures:
                powers = high_frequency_power(torch.cat([preds, target]), self.cutoff)
                values["preds_power"], values["target_power"] = powers.chunk(2)
        return values

    def rows(self, values: Mapping[str, Tensor]) -> Tensor:
        """SSIM's positive and negative parts, the prediction's and the target's power above the cutoff."""
        zeros = torch.zeros_like(next(iter(values.values())))
        ssim = values.get("ssim", zeros)
        return torch.stack([ssim.clamp(min=0), (-ssim).clamp(min=0), values.get("preds_power", zeros),
                            values.get("target_power", zeros)])  # fmt: skip

    def compute(self) -> dict[str, Tensor]:
        """``{"ssim": mean SSIM, "sharpness": power ratio}`` over everything accumulated (synced across processes),
        0-dim tensors of the result dtype (torch's default; see :meth:`set_dtype`); NaN before any image."""
        sums, (images, _) = exact_sums(self.totals[: 4 * NUM_BINS].view(4, NUM_BINS)), self._counts()
        values = {
            "ssim": float(Fraction(sums[0] - sums[1]) / images) if images else float("nan"),
            "sharpness": float(sums[2] / sums[3]) if sums[3] else float("nan"),
        }
        if "sharpness" in self.figures and images and not sums[3]:
            warnings.warn(
                f"ImageFidelity: sharpness is undefined (NaN): the {images} target image(s) have no power above "
                f"{self.cutoff:g} cycles per pixel (constant or smooth images), so there is no detail to compare with",
                UserWarning,
                stacklevel=2,
            )
        return {name: torch.tensor(values[name], dtype=self._result_dtype, device=self.device) for name in self.figures}

    def figure_values(self) -> dict[str, Tensor]:
        """:meth:`compute` by figure name (the callback's form, as
        :meth:`MelCepstralDistortion.figure_values <pl_pmse.mcd.MelCepstralDistortion.figure_values>`)."""
        return self.compute()


def ssim_per_image(preds: Tensor, target: Tensor, data_range: tuple[float, float], clamps: bool) -> Tensor:
    """torchmetrics' SSIM of each image (Gaussian window, see the module doc), float64 ``[N]``."""
    if clamps:
        preds, target = preds.clamp(*data_range), target.clamp(*data_range)
    span = data_range[1] - data_range[0]
    c1, c2 = (SSIM_K1 * span) ** 2, (SSIM_K2 * span) ** 2
    count, channels, height, width = preds.shape
    planes = [x.reshape(count * channels, height, width) for x in (preds, target)]
    step = max(1, BLOCK_ELEMENTS // (height * width))  # CPU: planes per block, its temporaries stay in cache
    if not reduction.works_in_cache_blocks(preds.device):
        step = max(1, ACCELERATOR_BLOCK // (height * width))  # an accelerator: few large kernels, bounded memory
    window = _TAPS[preds.dtype]
    sums = [
        _ssim_map_sums(p, t, window, c1, c2) for p, t in zip(planes[0].split(step), planes[1].split(step), strict=True)
    ]
    per_plane = torch.cat(sums).view(count, channels)
    return _row_sums(per_plane) / (channels * height * width)


def _ssim_map_sums(preds: Tensor, target: Tensor, window: list[float], c1: float, c2: float) -> Tensor:
    """The sum of each plane's SSIM map (``[P, H, W]`` planes, reflect padded by half the window), float64 ``[P]``."""
    pad = len(window) // 2
    preds, target = (F.pad(x, (pad, pad, pad, pad), mode="reflect") for x in (preds, target))
    moments = _window_means(torch.stack([preds, target, preds * preds, target * target, preds * target]), window)
    mu_p, mu_t, pp, tt, pt = moments.unbind(0)
    mu_pp, mu_tt, mu_pt = mu_p * mu_p, mu_t * mu_t, mu_p * mu_t
    var_p, var_t = (pp - mu_pp).clamp(min=0), (tt - mu_tt).clamp(min=0)
    covariance = pt - mu_pt
    index = ((2 * mu_pt + c1) * (2 * covariance + c2)) / ((mu_pp + mu_tt + c1) * (var_p + var_t + c2))
    return _row_sums(index.flatten(1))


ACCELERATOR_BLOCK = 1 << 24  # pixels per block on accelerators: the 5 windowed moments stay below ~1 GB


def _gaussian_taps(dtype: torch.dtype) -> list[float]:
    """torchmetrics' 1-D Gaussian window, in its dtype: ``exp(-(x / sigma)**2 / 2)`` normalised to sum 1."""
    x = torch.arange((1 - SSIM_WINDOW) / 2, (1 + SSIM_WINDOW) / 2, step=1, dtype=dtype, device="cpu")
    gauss = torch.exp(-torch.pow(x / SSIM_SIGMA, 2) / 2)
    return (gauss / gauss.sum()).tolist()


# built at import, on the CPU: no tensor is read back in an update (any default device, FakeTensorMode)
_TAPS = {dtype: _gaussian_taps(dtype) for dtype in (torch.float32, torch.float64)}


def _window_means(x: Tensor, taps: list[float]) -> Tensor:
    """The separable window over the last two dims of ``x`` (valid positions): weighted sums of shifted views, one
    multiplication and one addition each, the same bits on every device and batch split."""
    for dim in (-1, -2):
        span = x.shape[dim] - len(taps) + 1
        total = taps[0] * x.narrow(dim, 0, span)
        for i, tap in enumerate(taps[1:], start=1):
            total = total + tap * x.narrow(dim, i, span)
        x = total
    return x


def _row_sums(x: Tensor) -> Tensor:
    """Float64 sum of each row by a running sum: on a CPU one order along the row whatever the thread count and
    batch; on an accelerator the scan's order follows the row's length, not the batch."""
    return torch.cumsum(x, 1, dtype=torch.float64)[:, -1]


def high_frequency_power(images: Tensor, cutoff: float = SHARPNESS_CUTOFF) -> Tensor:
    """Power of each image's channel mean at radial frequencies of at least ``cutoff`` cycles per pixel, float64
    ``[N]`` (see the module doc).

    Example:
        >>> import torch
        >>> flat, stripes = torch.ones(1, 1, 8, 8), torch.tensor([1.0, -1.0]).repeat(8, 4).view(1, 1, 8, 8)
        >>> high_frequency_power(torch.cat([flat, stripes])).tolist()  # all of the stripes' power is at 0.5
        [0.0, 64.0]
    """
    planes = images.mean(1)
    weights = _band_weights(*planes.shape[-2:], cutoff, planes.device)
    chunks = planes.split(_FFT_CHUNK) if planes.device.type != "cpu" else [planes]
    powers = []
    for chunk in chunks:
        count = chunk.shape[0]
        if planes.device.type != "cpu" and count < _FFT_CHUNK:  # the same plan shape for the last chunk
            chunk = torch.cat([chunk, chunk.new_zeros(_FFT_CHUNK - count, *chunk.shape[1:])])
        spectrum = torch.fft.rfft2(chunk, norm="ortho")
        power = (spectrum.real * spectrum.real + spectrum.imag * spectrum.imag) * weights
        powers.append(_row_sums(power.flatten(1))[:count])
    return torch.cat(powers)


@functools.lru_cache(maxsize=16)
def _band_weights(height: int, width: int, cutoff: float, device: torch.device) -> Tensor:
    """Per frequency of the half spectrum: how many frequencies of the full spectrum it stands for (2 for columns
    with a mirror image, else 1) where its radius is at least ``cutoff``, else 0. The radius test is made in exact
    integers (``(ky W)**2 + (kx H)**2 >= (cutoff H W)**2``, the cutoff as an exact fraction)."""
    fraction = Fraction(cutoff)
    edge, scale = (fraction.numerator * height * width) ** 2, fraction.denominator**2
    signed = [ky if ky < (height + 1) // 2 else ky - height for ky in range(height)]  # as fftfreq orders them
    mirrored = [1.0] + [2.0] * ((width - 1) // 2) + [1.0] * (width % 2 == 0)  # the Nyquist column has no mirror
    weights = [[m * (((ky * width) ** 2 + (kx * height) ** 2) * scale >= edge) for kx, m in enumerate(mirrored)]
               for ky in signed]  # fmt: skip  # Python integers: exact, and no tensor read back
    return torch.tensor(weights, dtype=torch.float32, device=device)
