"""Weight-free image spaces: the raw pixels and a Laplacian pyramid."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor
from torch.nn import functional as F

from .. import checks, reduction
from .base import Space
from .registry import register_space

_BINOMIAL = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)
# ITU-R BT.601 luma and chroma of RGB in [0, 1]
_YCBCR = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))


def _ycbcr(x: Tensor) -> list[Tensor]:
    """BT.601 luma, Cb and Cr planes ``[N, H, W]`` of RGB ``[N, 3, H, W]`` (elementwise: exact on every device)."""
    return [sum(weight * x[:, c] for c, weight in enumerate(row)) for row in _YCBCR]


class ImageSpace(Space):
    """Image batches ``[N, C, H, W]``, float in [0, 1] by default."""

    modality = "image"
    layout = "images [N, C, H, W]"
    allowed_ndim = (4,)

    def layout_hint(self, x: Tensor) -> str:
        if x.dim() == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] > 4:
            return f"; shape {tuple(x.shape)} looks channels-last [N, H, W, C]: pass x.permute(0, 3, 1, 2)"
        return ""


@register_space("pixel")
class PixelSpace(Space):
    """The raw signal: Perception MSE in this space is the plain MSE over all elements.

    Accepts any batch ``[N, ...]`` (images, audio, features, tabular rows).

    Example:
        >>> import torch
        >>> PixelSpace().pairs(torch.zeros(2, 3), torch.ones(2, 3)).keys()
        dict_keys(['pixel'])
    """

    name = "pixel"
    exact_features = True

    def __init__(self, component_weights: Mapping[str, float] | None = None) -> None:
        super().__init__(component_weights=component_weights)


MAX_PYRAMID_LEVELS = 16


@register_space("pyramid")
class LaplacianPyramid(ImageSpace):
    """Laplacian pyramid (Burt & Adelson): band-pass levels from fine to coarse plus the low-pass residual.

    Level ``k`` is ``G_k - up(G_{k+1})`` where ``G_0`` is the image, ``G_{k+1} = down(blur(G_k))`` and the blur
    is the separable binomial kernel ``[1, 4, 6, 4, 1] / 16`` with reflect padding. The bands sum back to the
    image, so the breakdown tells fine-detail errors (blur, noise) from coarse ones (colour, exposure).
    Components: ``pixel``, ``band0`` (finest) ... ``band{levels-2}``, ``lowpass``; with ``luma_chroma=True``
    the pyramid is built on BT.601 luma (``luma_band0``, ...) and chroma (``chroma_band0``, ...) of RGB input.

    Args:
        levels: pyramid levels including the low-pass residual (>= 2).
        luma_chroma: split RGB into luma and chroma pyramids.
        component_weights: ``{component: weight}`` overrides (all default to 1).

    Example:
        >>> LaplacianPyramid(levels=3).component_names
        ('pixel', 'band0', 'band1', 'lowpass')
    """

    name = "pyramid"
    exact_features = True
    linear = True

    def __init__(
        self, levels: int = 5, luma_chroma: bool = False, component_weights: Mapping[str, float] | None = None
    ) -> None:
        if isinstance(levels, bool) or not isinstance(levels, int) or not 2 <= levels <= MAX_PYRAMID_LEVELS:
            raise ValueError(
                f"levels: expected an integer from 2 to {MAX_PYRAMID_LEVELS} (the coarsest level needs images of "
                f"3 * 2**(levels - 2) pixels: 49152 at {MAX_PYRAMID_LEVELS}), got {levels!r}"
            )
        self.levels = levels
        self.luma_chroma = bool(luma_chroma)
        names = [*(f"band{k}" for k in range(levels - 1)), "lowpass"]
        if self.luma_chroma:
            names = [f"{part}_{name}" for part in ("luma", "chroma") for name in names]
        super().__init__(dict.fromkeys(names, 1.0), component_weights=component_weights)

    @property
    def min_size(self) -> int:
        """The coarsest blurred level, ``ceil(size / 2**(levels - 2))``, needs 3 pixels for the reflect padding."""
        return 2 ** (self.levels - 1) + 1

    def check_input(self, x: Tensor) -> None:
        super().check_input(x)
        if self.luma_chroma and x.shape[1] != 3:
            raise ValueError(f"preds and target: luma_chroma=True needs RGB [N, 3, H, W], got shape {tuple(x.shape)}")
        for dim in (-2, -1):
            checks.check_min_size(x, self.min_size, f"height and width ({self.levels} levels)", self.name, dim)

    def feature_dtype(self, x: Tensor) -> torch.dtype:
        return torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32

    def features(self, x: Tensor) -> dict[str, Tensor]:
        if not self.luma_chroma:
            return dict(zip(self.component_names[1:], self.pyramid(x), strict=True))
        ycbcr = torch.stack(_ycbcr(x), 1)
        bands = [*self.pyramid(ycbcr[:, :1]), *self.pyramid(ycbcr[:, 1:])]
        return dict(zip(self.component_names[1:], bands, strict=True))

    def pyramid(self, x: Tensor) -> list[Tensor]:
        """The ``levels`` bands of ``x``, finest first, low-pass last.

        Worked in blocks of about ``BLOCK_ELEMENTS`` (planes x rows, each with its 2-pixel reflected border), so
        that the temporaries stay in cache and the memory beyond the bands stays small at any image size; every
        value is computed by the same operations whatever the block, so the split changes no bit.
        """
        bands = []
        planes = x.reshape(-1, *x.shape[-2:])
        for _ in range(self.levels - 1):
            smaller = _blocked(planes, _down_size(planes.shape[-2:]), _blur_down)
            bands.append(_blocked(planes, planes.shape[-2:], _band, smaller))
            planes = smaller
        return [band.view(*x.shape[:-2], *band.shape[-2:]) for band in (*bands, planes)]

    def collapse(self, bands: list[Tensor]) -> Tensor:
        """The image that :meth:`pyramid` split into ``bands`` (its inverse, up to rounding).

        Example:
            >>> import torch
            >>> x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
            >>> space = LaplacianPyramid(levels=3)
            >>> torch.allclose(space.collapse(space.pyramid(x)), x)
            True
        """
        image = bands[-1].reshape(-1, *bands[-1].shape[-2:])
        for band in reversed(bands[:-1]):
            planes = band.reshape(-1, *band.shape[-2:])
            image = planes + _blocked(planes, planes.shape[-2:], _expanded, image)
        return image.view(bands[0].shape)


BLOCK_ELEMENTS = 1 << 16  # elements per block of the pyramid's work (256 KiB of float32)


def _down_size(size: tuple[int, int]) -> tuple[int, int]:
    return (size[0] + 1) // 2, (size[1] + 1) // 2


def _blocked(planes: Tensor, size: tuple[int, int], work: Callable[..., Tensor], *extra: Tensor) -> Tensor:
    """``work(plane_chunk, rows, *extra_chunks)`` for every block of output rows ``rows`` of ``size``, put together
    into one ``[P, *size]`` result. Without autograd, blocks of about ``BLOCK_ELEMENTS`` are written into the result.
    Under autograd blocks are whole planes, split and concatenated (slices of one tensor would make the backward
    fill a full-size gradient once per block)."""
    count, (height, width) = planes.shape[0], size
    graph = torch.is_grad_enabled() and any(x.requires_grad for x in (planes, *extra))
    if not reduction.works_in_cache_blocks(planes.device) and not graph:  # an accelerator: whole planes at once
        return work(planes, range(height), *extra)
    plane_step = max(1, BLOCK_ELEMENTS // (height * width))
    chunks = list(zip(planes.split(plane_step), *(x.split(plane_step) for x in extra), strict=True))
    if graph:
        return torch.cat([work(chunk[0], range(height), *chunk[1:]) for chunk in chunks])
    row_step = height if plane_step > 1 else max(1, BLOCK_ELEMENTS // width)
    out = planes.new_empty(count, height, width)
    for first, chunk in zip(range(0, count, plane_step), chunks, strict=True):
        for top in range(0, height, row_step):
            rows = range(top, min(top + row_step, height))
            out[first : first + plane_step, top : rows.stop] = work(chunk[0], rows, *chunk[1:])
    return out


def _padded_rows(x: Tensor, first: int, stop: int) -> Tensor:
    """Rows ``first .. stop - 1`` of ``[P, H, W]`` planes (out-of-range ones mirrored, as reflect padding does), with
    2 mirrored columns each side."""
    height = x.shape[-2]
    return _padded(x[:, max(first, 0) : min(stop, height)], max(0, -first), max(0, stop - height))


def _padded(x: Tensor, top: int, bottom: int) -> Tensor:
    """``[P, H, W]`` planes with ``top`` / ``bottom`` rows and 2 columns each side mirrored (reflect padding): one
    ``F.pad`` without autograd; under autograd slices, flips and concatenation, which save nothing for backward
    (``F.pad``'s reflect mode would save its input). Copies both ways: the same bits."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return F.pad(x, (2, 2, top, bottom), mode="reflect")
    return _mirror(_mirror(x, 1, top, bottom), 2, 2, 2)


def _mirror(x: Tensor, dim: int, before: int, after: int) -> Tensor:
    """``x`` with ``before`` / ``after`` entries mirrored about its first / last entry along ``dim``."""
    if not before and not after:
        return x
    size = x.shape[dim]
    return torch.cat([x.narrow(dim, 1, before).flip(dim), x, x.narrow(dim, size - 1 - after, after).flip(dim)], dim)


def _taps(x: Tensor, dim: int, count: int, step: int, gain: float = 1.0) -> Tensor:
    """``sum_i gain * tap_i * x[i + step * j]`` for ``j < count`` along ``dim``: the 5-tap binomial filter as weighted
    sums of shifted views, one multiplication and one addition each (no fused multiply-add, whose rounding differs
    between CPU kernels; 3x faster than a depthwise conv2d on CPU), every ``step``-th output only. ``gain`` is a power
    of two: it scales every rounding alike, the same bits as scaling the result."""
    span = step * (count - 1) + 1
    index = (slice(None),) * (dim % x.dim()) + (slice(None, None, step),)
    terms = [gain * tap * x.narrow(dim, i, span)[index] for i, tap in enumerate(_BINOMIAL)]
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _blur_down(planes: Tensor, rows: range) -> Tensor:
    """Rows ``rows`` of ``blur(planes)[..., ::2, ::2]`` (the next Gaussian level)."""
    strip = _padded_rows(planes, 2 * rows.start - 2, 2 * rows.stop + 1)
    return _taps(_taps(strip, -1, (planes.shape[-1] + 1) // 2, 2), -2, len(rows), 2)


def _band(planes: Tensor, rows: range, smaller: Tensor) -> Tensor:
    """Rows ``rows`` of ``planes - expanded(smaller)``: one Laplacian band."""
    return planes[:, rows.start : rows.stop] - _expanded(planes, rows, smaller)


def _expanded(planes: Tensor, rows: range, smaller: Tensor) -> Tensor:
    """Rows ``rows`` of ``4 * blur(up(smaller))``, where ``up`` puts the values of ``smaller`` on the even rows and
    columns of a zero image of the planes' size."""
    height, width = planes.shape[-2:]
    first, stop = max(rows.start - 2, 0), min(rows.stop + 2, height)
    even = first + first % 2  # the first even row of up in [first, stop): a row of smaller
    up = smaller.new_zeros(smaller.shape[0], stop - first, width)
    up[:, even - first :: 2, ::2] = smaller[:, even // 2 : even // 2 + len(range(even, stop, 2))]
    up = _padded(up, first - (rows.start - 2), rows.stop + 2 - stop)
    return _taps(_taps(up, -1, width, 1), -2, len(rows), 1, gain=4.0)


@register_space("aspects")
class ImageAspects(ImageSpace):
    """What the error is made of, in four components named for what a person sees (RGB input):

    - ``luminance``, shadows and exposure: the low-pass of BT.601 luma, the Gaussian level ``lowpass_levels`` of its
      pyramid (1/4 of the size by default: a shading, a vignette, a brightness shift);
    - ``colour``: the two BT.601 chroma planes (Cb, Cr) at full resolution (a tint, a colour cast, colour bleeding);
    - ``edges``: the horizontal and vertical differences of the first Gaussian level of luma (half size): structure
      between the low-pass and the finest band, about 0.06 to 0.25 cycles per pixel (outlines and contours moved or
      softened, ringing beside them);
    - ``texture``: the finest Laplacian band of luma (detail from 0.25 to 0.5 cycles per pixel: blur loses it, noise
      and hallucinated detail add to it).

    Each is the MSE of a fixed linear transform (the pyramid's binomial filter, see :class:`LaplacianPyramid`), made
    by elementwise arithmetic: measured on the difference in one pass and exact like the pyramid. ``pixel`` is in
    the breakdown at weight 0; the total is the sum of the four (``component_weights`` to weigh them).

    Example:
        >>> import torch
        >>> target = torch.rand(1, 3, 32, 32)
        >>> brighter = ImageAspects().pairs(target + 0.1, target)  # a brightness shift: luminance only
        >>> {name: round(float(d.square().mean()), 4) for name, (d, _) in brighter.items() if name != "pixel"}
        {'luminance': 0.01, 'colour': 0.0, 'edges': 0.0, 'texture': 0.0}
    """

    name = "aspects"
    exact_features = True
    linear = True

    def __init__(self, lowpass_levels: int = 2, component_weights: Mapping[str, float] | None = None) -> None:
        if isinstance(lowpass_levels, bool) or not isinstance(lowpass_levels, int) or lowpass_levels < 1:
            raise ValueError(f"lowpass_levels: expected an integer >= 1, got {lowpass_levels!r}")
        self.lowpass_levels = lowpass_levels
        aspects = dict.fromkeys(("luminance", "colour", "edges", "texture"), 1.0)
        super().__init__(aspects, raw_weight=0.0, component_weights=component_weights)

    @property
    def min_size(self) -> int:
        """The coarsest blurred level needs 3 pixels for the reflect padding (as in the pyramid)."""
        return 2**self.lowpass_levels + 1

    def check_input(self, x: Tensor) -> None:
        super().check_input(x)
        if x.shape[1] != 3:
            raise ValueError(f"preds and target: space 'aspects' needs RGB [N, 3, H, W], got shape {tuple(x.shape)}")
        for dim in (-2, -1):
            checks.check_min_size(x, self.min_size, f"height and width ({self.lowpass_levels} low-pass levels)",
                                  self.name, dim)  # fmt: skip

    def feature_dtype(self, x: Tensor) -> torch.dtype:
        return torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32

    def features(self, x: Tensor) -> dict[str, Tensor]:
        luma, cb, cr = _ycbcr(x)
        first = _blocked(luma, _down_size(luma.shape[-2:]), _blur_down)  # the first Gaussian level
        texture = _blocked(luma, luma.shape[-2:], _band, first)
        low = first
        for _ in range(self.lowpass_levels - 1):
            low = _blocked(low, _down_size(low.shape[-2:]), _blur_down)
        edges = torch.cat([first.diff(dim=-1).flatten(1), first.diff(dim=-2).flatten(1)], 1)
        return {"luminance": low, "colour": torch.stack([cb, cr], 1), "edges": edges, "texture": texture}
