"""perception_mse in the raw spaces: values against torchmetrics, per-sample references, gradients."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.functional import mean_squared_error

from pl_pmse import perception_mse, perception_mse_components
from pl_pmse.reduction import squared_error_sums

SHAPES = [(5,), (3, 7), (2, 3, 17, 9), (4, 1, 64, 64), (2, 2, 3, 4, 5), (1, 3, 1000), (3, 5000)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def reference_per_sample(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    diff = preds.double() - target.double()
    return diff.square().reshape(diff.shape[0], -1).mean(1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mean_equals_torchmetrics_mse(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    preds, target = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    ours = perception_mse(preds, target)
    reference = mean_squared_error(preds.double(), target.double())
    assert ours.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(ours.double(), reference, rtol=1e-6 if dtype != torch.float64 else 1e-12, atol=0)
    # torchmetrics on the input dtype itself (float32 accumulation) agrees to float32 precision
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(ours, mean_squared_error(preds, target), rtol=1e-5, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_reduction_none_and_sum(shape: tuple[int, ...]) -> None:
    preds, target = torch.rand(shape), torch.rand(shape)
    per_sample = perception_mse(preds, target, reduction="none")
    assert per_sample.shape == (shape[0],)
    torch.testing.assert_close(per_sample.double(), reference_per_sample(preds, target), rtol=1e-6, atol=0)
    torch.testing.assert_close(perception_mse(preds, target, reduction="sum"), per_sample.sum(), rtol=1e-6, atol=0)
    torch.testing.assert_close(perception_mse(preds, target), per_sample.mean(), rtol=1e-6, atol=0)


def test_components_of_the_raw_space() -> None:
    preds, target = torch.rand(4, 2, 30), torch.rand(4, 2, 30)
    assert perception_mse_components(preds, target, space="waveform", reduction="none").keys() == {"waveform"}
    values = perception_mse_components(preds, target, reduction="none")["pixel"]
    torch.testing.assert_close(values, perception_mse(preds, target, reduction="none"))


def test_gradcheck_float64() -> None:
    preds = torch.rand(3, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    target = torch.rand(3, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    for reduction in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(lambda p, t, r=reduction: perception_mse(p, t, reduction=r), (preds, target))


def test_gradient_matches_closed_form() -> None:
    preds = torch.rand(2, 3, 8, 8, requires_grad=True)
    target = torch.rand(2, 3, 8, 8)
    perception_mse(preds, target).backward()
    torch.testing.assert_close(preds.grad, 2 * (preds.detach() - target) / preds.numel())


def test_grad_path_equals_fast_path() -> None:
    preds, target = torch.rand(4, 3, 33, 65), torch.rand(4, 3, 33, 65)
    fast = perception_mse(preds, target, reduction="none")
    with_grad = perception_mse(preds.clone().requires_grad_(), target, reduction="none")
    torch.testing.assert_close(with_grad.detach(), fast, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x.to(memory_format=torch.channels_last),
        lambda x: x.transpose(2, 3),
        lambda x: x[:, :, ::2, 1::3],
        lambda x: x[:1].expand(4, -1, -1, -1),
    ],
    ids=["channels_last", "transposed", "strided", "expanded"],
)
def test_non_contiguous_layouts(make) -> None:
    base_p, base_t = torch.rand(4, 3, 40, 40), torch.rand(4, 3, 40, 40)
    preds, target = make(base_p), make(base_t)
    assert not preds.is_contiguous()
    expected = reference_per_sample(preds.contiguous(), target.contiguous())
    torch.testing.assert_close(perception_mse(preds, target, reduction="none").double(), expected, rtol=1e-6, atol=0)
    for mixed in (
        perception_mse(preds, target.contiguous(), reduction="none"),
        perception_mse(preds.contiguous(), target, reduction="none"),
    ):
        torch.testing.assert_close(mixed.double(), expected, rtol=1e-6, atol=0)


def test_integer_inputs_with_data_range() -> None:
    preds = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    target = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    ours = perception_mse(preds, target, data_range=255)
    assert ours.item() == pytest.approx(mean_squared_error(preds.double(), target.double()).item(), rel=1e-7)


def test_per_sample_values_do_not_depend_on_the_batch() -> None:
    """The streaming path gives each sample the same bits whatever batch it arrives in."""
    preds, target = torch.rand(7, 3, 300, 301), torch.rand(7, 3, 300, 301)
    whole = squared_error_sums(preds, target)
    singles = torch.cat([squared_error_sums(preds[i : i + 1], target[i : i + 1]) for i in range(7)])
    pairs = torch.cat([squared_error_sums(preds[i : i + 2], target[i : i + 2]) for i in range(0, 7, 2)])
    assert torch.equal(whole, singles) and torch.equal(whole, pairs)


def test_empty_batch() -> None:
    empty = torch.zeros(0, 3, 8, 8)
    assert perception_mse(empty, empty, reduction="none").shape == (0,)
    assert perception_mse(empty, empty, reduction="sum").item() == 0
    assert perception_mse(empty, empty).isnan()


def test_nan_strategy_ignore_keeps_gradients_clean() -> None:
    preds = torch.rand(4, 6, requires_grad=True)
    target = torch.rand(4, 6)
    poisoned = preds.clone()
    poisoned.data[2, 3] = float("nan")
    per_sample = perception_mse(poisoned, target, reduction="none", nan_strategy="ignore")
    assert per_sample[2].isnan() and per_sample[[0, 1, 3]].isfinite().all()
    loss = perception_mse(poisoned, target, nan_strategy="ignore")
    loss.backward()
    assert torch.isfinite(preds.grad).all() and (preds.grad[2] == 0).all()
    torch.testing.assert_close(loss, per_sample[[0, 1, 3]].mean())


def test_compile() -> None:
    """torch.compile traces the functional (a plus, not a must: skipped where the compiler is unavailable)."""
    compiled = torch.compile(lambda p, t: perception_mse(p, t, reduction="none"), backend="eager")
    preds, target = torch.rand(3, 5, requires_grad=True), torch.rand(3, 5)
    torch.testing.assert_close(compiled(preds, target), perception_mse(preds, target, reduction="none"))
