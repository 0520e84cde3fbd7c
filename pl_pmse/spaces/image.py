"""Weight-free image spaces: the raw pixels and a Laplacian pyramid."""

from __future__ import annotations

from collections.abc import Mapping

from .base import Space, register_space


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

    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        super().__init__(weights=weights)
