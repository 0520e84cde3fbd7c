"""The aspects space: each kind of change lands in its own component, against an independent reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pl_pmse import PerceptionMSE, perception_mse_components
from tests.test_fidelity import photograph_batch

ASPECTS = ("luminance", "colour", "edges", "texture")


def components(preds: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    return {name: float(value) for name, value in perception_mse_components(preds, target, space="aspects").items()}


def blur_down(planes: torch.Tensor) -> torch.Tensor:
    """Reference: the binomial blur by conv2d on reflect padding, every second pixel ([N, H, W])."""
    tap = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=planes.dtype) / 16
    kernel = (tap[:, None] * tap[None, :])[None, None]
    return F.conv2d(F.pad(planes[:, None], (2, 2, 2, 2), mode="reflect"), kernel)[:, 0, ::2, ::2]


def test_components_equal_a_reference_built_from_conv2d() -> None:
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 20, 18, generator=generator, dtype=torch.float64)
    preds = (target + 0.1 * torch.randn(target.shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    d = preds - target
    ycbcr = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]],
                         dtype=torch.float64)  # fmt: skip
    luma, cb, cr = torch.einsum("kc,nchw->knhw", ycbcr, d)
    first = blur_down(luma)
    up = torch.zeros_like(luma)
    up[:, ::2, ::2] = first
    tap = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64) / 16
    expanded = 4 * F.conv2d(F.pad(up[:, None], (2, 2, 2, 2), mode="reflect"), (tap[:, None] * tap)[None, None])[:, 0]
    expected = {
        "luminance": blur_down(first).square().mean(),
        "colour": torch.stack([cb, cr]).square().mean(),
        "edges": torch.cat([first.diff(dim=-1).flatten(1), first.diff(dim=-2).flatten(1)], 1).square().mean(),
        "texture": (luma - expanded).square().mean(),
    }
    measured = perception_mse_components(preds, target, space="aspects")
    for name in ASPECTS:
        assert measured[name].item() == pytest.approx(expected[name].item(), rel=1e-9), name
    metric = PerceptionMSE("aspects").set_dtype(torch.float64)
    metric.update(preds, target)
    assert metric.compute().item() == pytest.approx(sum(expected[name].item() for name in ASPECTS), rel=1e-9)


def test_each_kind_of_change_lands_in_its_own_component() -> None:
    target = photograph_batch()[:, :, :128, :128]
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    ramp = torch.linspace(-0.15, 0.15, 128).view(1, 1, 1, 128)  # a shading across the image, grey
    changes = {
        "luminance": target + ramp,
        "colour": target + torch.tensor([0.06, -0.03, -0.06]).view(1, 3, 1, 1),  # a colour cast, luma kept ~equal
        "texture": target + 0.05 * noise.mean(1, keepdim=True),  # fine grey noise
        "edges": target + 0.05 * torch.sin(torch.arange(128.0) * (2 * torch.pi / 8)).view(1, 1, 1, 128),  # ringing
    }  # (ringing beside contours: grey structure at 1/8 cycle per pixel, between the low-pass and the finest band)
    for expected, preds in changes.items():
        values = components(preds, target)
        largest = max(ASPECTS, key=values.get)
        assert largest == expected, (expected, values)
    shading = components(changes["luminance"], target)
    assert shading["luminance"] > 20 * max(shading["edges"], shading["texture"], shading["colour"])
    cast = components(changes["colour"], target)
    assert cast["colour"] > 20 * max(cast["edges"], cast["texture"])
    blurred = F.avg_pool2d(F.pad(target, (1, 1, 1, 1), mode="reflect"), 3, stride=1)
    blur = components(blurred, target)
    assert blur["texture"] > 5 * blur["luminance"] and blur["colour"] < blur["texture"]
    smooth = F.avg_pool2d(F.pad(target, (2, 2, 2, 2), mode="reflect"), 5, stride=1)  # contours without texture
    moved = components(torch.roll(smooth, shifts=2, dims=-1), smooth)
    assert moved["edges"] > moved["texture"] and moved["edges"] > moved["colour"]


def test_bad_input_names_the_space() -> None:
    with pytest.raises(ValueError, match=r"space 'aspects' needs RGB \[N, 3, H, W\], got shape \(1, 1, 16, 16\)"):
        perception_mse_components(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16), space="aspects")
    with pytest.raises(ValueError, match=r"height and width \(2 low-pass levels\) of at least 5, got 4"):
        perception_mse_components(torch.rand(1, 3, 4, 16), torch.rand(1, 3, 4, 16), space="aspects")
    with pytest.raises(ValueError, match="lowpass_levels: expected an integer >= 1, got 0"):
        PerceptionMSE("aspects", lowpass_levels=0)
