"""Weight-free image spaces: the raw pixels and a Laplacian pyramid."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import checks
from .base import Space
from .registry import register_space

_BINOMIAL = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)
# ITU-R BT.601 luma and chroma of RGB in [0, 1]
_YCBCR = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))


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

    def __init__(self, component_weights: Mapping[str, float] | None = None) -> None:
        super().__init__(component_weights=component_weights)


@register_space("pyramid")
class LaplacianPyramid(Space):
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
    modality = "image"
    layout = "images [N, C, H, W]"
    allowed_ndim = (4,)

    def __init__(
        self, levels: int = 5, luma_chroma: bool = False, component_weights: Mapping[str, float] | None = None
    ) -> None:
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
            raise ValueError(f"levels: expected an integer >= 2, got {levels!r}")
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
        matrix = torch.tensor(_YCBCR, dtype=x.dtype, device=x.device)
        ycbcr = torch.einsum("rc,nchw->nrhw", matrix, x)
        bands = [*self.pyramid(ycbcr[:, :1]), *self.pyramid(ycbcr[:, 1:])]
        return dict(zip(self.component_names[1:], bands, strict=True))

    def pyramid(self, x: Tensor) -> list[Tensor]:
        """The ``levels`` bands of ``x``, finest first, low-pass last."""
        bands = []
        for _ in range(self.levels - 1):
            smaller = self._blur(x)[..., ::2, ::2]
            bands.append(x - self._expand(smaller, x.shape[-2:]))
            x = smaller
        return [*bands, x]

    def _blur(self, x: Tensor) -> Tensor:
        """Separable 5-tap binomial filter with reflect padding, as weighted sums of shifted views (3x faster
        than a depthwise conv2d on CPU)."""
        x = F.pad(x, (2, 2, 2, 2), mode="reflect")
        rows = sum(tap * x[..., i : x.shape[-1] - 4 + i] for i, tap in enumerate(_BINOMIAL))
        return sum(tap * rows[..., i : rows.shape[-2] - 4 + i, :] for i, tap in enumerate(_BINOMIAL))

    def _expand(self, x: Tensor, size: torch.Size) -> Tensor:
        """Zero-insertion upsampling to ``size`` followed by the blur (x4 to keep the mean)."""
        up = x.new_zeros(*x.shape[:2], *size)
        up[..., ::2, ::2] = x
        return 4 * self._blur(up)
