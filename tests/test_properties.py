"""Property-based tests: any shape, dtype, layout, batch split or rank split agrees with a float64 reference."""

from __future__ import annotations

import io
import random
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pl_pmse import PerceptionMSE, perception_mse
from pl_pmse.exact import exact_bins, exact_ratio
from pl_pmse.panels.png import encode_png
from pl_pmse.reduction import squared_error_sums

# arbitrary values, not images in [0, 1]: the raw spaces' range hint is expected here
pytestmark = pytest.mark.filterwarnings("ignore:PerceptionMSE. space .* assumes values in:UserWarning")

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
TOLERANCE = {torch.float16: 1e-6, torch.bfloat16: 1e-6, torch.float32: 1e-6, torch.float64: 1e-12}
shapes = st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple)


def tensors(shape: tuple[int, ...], dtype: torch.dtype, seed: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    make = lambda: (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)  # noqa: E731
    return make(), make()


def reference(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (preds.double() - target.double()).square().reshape(preds.shape[0], -1).mean(1)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16), scale=st.sampled_from([1e-3, 1.0, 1e3]),
       layout=st.sampled_from(["contiguous", "transposed", "strided"]))  # fmt: skip
def test_functional_matches_the_float64_reference(shape, dtype, seed, scale, layout) -> None:
    preds, target = tensors((3, *shape), dtype, seed, scale)
    if layout == "transposed" and preds.dim() > 2:
        preds, target = preds.transpose(1, -1), target.transpose(1, -1)
    elif layout == "strided":
        preds, target = preds[::2], target[::2]
    expected = reference(preds, target)
    per_sample = perception_mse(preds, target, reduction="none").double()
    torch.testing.assert_close(per_sample, expected, rtol=TOLERANCE[dtype], atol=0)
    torch.testing.assert_close(perception_mse(preds, target).double(), expected.mean(), rtol=TOLERANCE[dtype], atol=0)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, sizes=st.lists(st.integers(0, 5), min_size=1, max_size=6), seed=st.integers(0, 2**16),
       ranks=st.integers(1, 4), dtype=st.sampled_from(DTYPES))  # fmt: skip
def test_any_batch_and_rank_split_merges_to_the_same_bits(shape, sizes, seed, ranks, dtype) -> None:
    """Batches dealt to simulated ranks (some with none), merged in a random order, equal one pass over all."""
    total = sum(sizes)
    preds, target = tensors((total, *shape), dtype, seed, 1.0)
    single = PerceptionMSE().set_dtype(torch.float64)
    single.update(preds, target)
    metrics = [PerceptionMSE().set_dtype(torch.float64) for _ in range(ranks)]
    start = 0
    for index, size in enumerate(sizes):
        metrics[index % ranks].update(preds[start : start + size], target[start : start + size])
        start += size
    order = list(range(ranks))
    random.Random(seed).shuffle(order)
    merged = metrics[order[0]]
    for index in order[1:]:
        merged.merge_state(metrics[index])
    if total == 0:
        return
    assert torch.equal(merged.compute(), single.compute())
    torch.testing.assert_close(single.compute(), reference(preds, target).mean(), rtol=TOLERANCE[dtype], atol=0)


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.floats(0, 1e300, allow_nan=False, allow_infinity=False), min_size=1, max_size=40),
       divisor=st.integers(1, 10**6), seed=st.integers(0, 2**16))  # fmt: skip
def test_exact_accumulator_is_exact_and_order_free(values, divisor, seed) -> None:
    shuffled = list(values)
    random.Random(seed).shuffle(shuffled)
    halves = [shuffled[: len(shuffled) // 2], shuffled[len(shuffled) // 2 :]]
    bins = sum(exact_bins(torch.tensor([half or [0.0]], dtype=torch.float64))[0] for half in halves)
    expected = sum(Fraction(v) for v in values) / divisor
    assert exact_ratio(bins, divisor) == float(expected)
    # one value never puts 2**31 or more into a bin, so 2**32 values cannot overflow int64
    assert int(exact_bins(torch.tensor([values], dtype=torch.float64).T).max()) < 2**31


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), length=st.integers(1, 5000), seed=st.integers(0, 2**16))
def test_per_sample_sums_do_not_depend_on_the_batch(n, length, seed) -> None:
    preds, target = tensors((n, length), torch.float32, seed, 1.0)
    whole = squared_error_sums(preds, target)
    assert torch.equal(whole, torch.cat([squared_error_sums(preds[i : i + 1], target[i : i + 1]) for i in range(n)]))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 70), st.integers(1, 70), st.integers(0, 2**31 - 1))
def test_png_encoder_round_trips_through_pillow(height: int, width: int, seed: int) -> None:
    picture = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    picture[: height // 2] = picture[0, 0]  # flat regions too, as panels have
    with Image.open(io.BytesIO(encode_png(picture))) as decoded:
        assert decoded.mode == "RGB" and np.array_equal(np.asarray(decoded), picture)


def test_png_encoder_rejects_other_pictures() -> None:
    for picture in (np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8)):
        with pytest.raises(ValueError, match=r"image: expected uint8 \[H, W, 3\]"):
            encode_png(picture)
