"""The same number on every machine, precision and thread: integers measured exactly, spaces in their own precision,
spaces shared by threads, states that can be trusted."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
import torch

from pl_pmse import PerceptionMSE, perception_mse
from pl_pmse.reduction import integer_squared_error_parts

INTEGER_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]


def edge_integers(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Values at the edges of the dtype's range (min, max, their neighbours, 0) mixed with random ones."""
    info = torch.iinfo(dtype)
    edges = [info.min, info.min + 1, info.max - 1, info.max, max(info.min, 0), min(info.max, 1)]
    rng = random.Random(seed)
    count = math.prod(shape)
    values = [rng.choice(edges) if rng.random() < 0.7 else rng.randint(info.min, info.max) for _ in range(count)]
    return torch.tensor(values, dtype=dtype).view(shape)


def squared_error(preds: torch.Tensor, target: torch.Tensor) -> int:
    """The exact sum of squared differences, in Python integers."""
    return sum((a - b) ** 2 for a, b in zip(preds.flatten().tolist(), target.flatten().tolist(), strict=True))


@pytest.mark.parametrize("dtype", INTEGER_DTYPES, ids=str)
def test_integer_inputs_are_measured_exactly_at_the_edges_of_their_range(dtype: torch.dtype) -> None:
    info = torch.iinfo(dtype)
    preds, target = edge_integers(dtype, (7, 3, 5, 4), 0), edge_integers(dtype, (7, 3, 5, 4), 1)
    exact = Fraction(squared_error(preds, target))
    metric = PerceptionMSE(data_range=(info.min, info.max))
    for rows in (slice(0, 2), slice(2, 3), slice(3, 7)):
        metric.update(preds[rows], target[rows])
    summary = metric.compute_summary()
    assert summary["pixel"].item() == float(exact / preds.numel())  # the correctly rounded exact MSE
    span = info.max - info.min
    assert summary["psnr"].item() == pytest.approx(10 * math.log10(span**2 * preds.numel() / exact), rel=1e-13)
    per_sample = integer_squared_error_parts(preds, target)
    assert (per_sample >= 0).all() and per_sample.dtype == torch.float64
    for row in range(7):  # every part exact: their sum in Fractions is the exact squared error of the sample
        assert sum(Fraction(v) for v in per_sample[row].tolist()) == squared_error(preds[row], target[row])


def test_32_bit_pcm_differences_of_one_and_three_give_five() -> None:
    """The issue's row: full-scale int32 audio, where float32 loses the differences entirely (0.0 before)."""
    preds = torch.tensor([[2**31 - 1, -(2**31)]], dtype=torch.int32)
    target = torch.tensor([[2**31 - 2, -(2**31) + 3]], dtype=torch.int32)
    metric = PerceptionMSE("waveform", data_range=(-(2**31), 2**31 - 1))
    metric.update(preds, target)
    assert metric.compute().item() == 5.0
    assert perception_mse(preds, target, "waveform", data_range=(-(2**31), 2**31 - 1)).item() == 5.0


def test_integer_inputs_keep_their_exactness_with_validate_args_false_and_a_clamped_psnr() -> None:
    preds, target = edge_integers(torch.int64, (4, 50), 2), edge_integers(torch.int64, (4, 50), 3)
    low, high = -(2**40), 2**40
    checked = PerceptionMSE(data_range=(low, high))
    unchecked = PerceptionMSE(data_range=(low, high), validate_args=False)
    with pytest.raises(ValueError, match=r"preds: integer values in \[.*\] lie outside data_range"):
        checked.update(preds, target)  # int64 edges lie outside (-2**40, 2**40)
    assert checked.totals.abs().sum() == 0
    unchecked.update(preds, target)  # not checked: the MSE of the data, PSNR of the clamped data, both exact
    pairs = list(zip(preds.flatten().tolist(), target.flatten().tolist(), strict=True))
    exact = Fraction(sum((a - b) ** 2 for a, b in pairs), len(pairs))
    clamped = Fraction(sum((min(max(a, low), high) - min(max(b, low), high)) ** 2 for a, b in pairs), len(pairs))
    summary = unchecked.compute_summary()
    assert summary["pixel"].item() == float(exact)
    assert summary["psnr"].item() == pytest.approx(10 * math.log10((high - low) ** 2 / clamped), rel=1e-13)


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64], ids=str)
def test_unsigned_types_torch_barely_supports_are_refused_with_a_conversion_hint(dtype: torch.dtype) -> None:
    metric = PerceptionMSE(data_range=255)
    with pytest.raises(TypeError, match=rf"preds: {dtype} is not supported .* convert it"):
        metric.update(torch.ones(2, 3, dtype=dtype), torch.ones(2, 3, dtype=dtype))


def test_psnr_is_finite_for_any_positive_range() -> None:
    metric = PerceptionMSE(data_range=1e160)
    metric.update(torch.full((2, 4), 1e150, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64))
    assert metric.compute_summary()["psnr"].item() == pytest.approx(10 * (2 * 160 - 2 * 150), rel=1e-12)


def test_meta_inputs_get_the_clear_error_in_the_metric_and_the_functional() -> None:
    metric = PerceptionMSE()
    meta = torch.ones(2, 3, device="meta")
    for call in (lambda: metric.update(meta, meta), lambda: perception_mse(meta, meta)):
        with pytest.raises(ValueError, match="preds and target: are on the meta device"):
            call()
    assert metric.update_count == 0
