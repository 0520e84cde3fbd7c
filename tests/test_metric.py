"""PerceptionMSE: values against torchmetrics, exact accumulation, torchmetrics behaviours."""

from __future__ import annotations

import math
import pickle
import random
from fractions import Fraction

import pytest
import torch
from torchmetrics import MeanSquaredError
from torchmetrics.image import PeakSignalNoiseRatio

from pl_pmse import PerceptionMSE, perception_mse
from pl_pmse.exact import NUM_BINS, _exact_row_sums, exact_bins, exact_ratio, exact_ratios, exact_sums
from pl_pmse.reduction import squared_error_sums


def random_batches(count: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        n = int(torch.randint(1, 6, (), generator=generator))
        yield (
            torch.rand((n, *shape), generator=generator).to(dtype),
            torch.rand((n, *shape), generator=generator).to(dtype),
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 16, 16), (1, 9, 31), (200,)])
def test_equals_torchmetrics_mse_and_psnr(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    ours = PerceptionMSE(data_range=1.0).set_dtype(torch.float64)
    mse, psnr = MeanSquaredError().double(), PeakSignalNoiseRatio(data_range=1.0).double()
    mse.set_dtype(torch.float64)
    psnr.set_dtype(torch.float64)
    for preds, target in random_batches(20, shape, dtype):
        ours.update(preds, target)
        mse.update(preds.double(), target.double())
        psnr.update(preds.double(), target.double())
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(ours.compute(), mse.compute(), rtol=tolerance, atol=0)
    # torchmetrics keeps data_range in float32, so its PSNR is float32-accurate only
    torch.testing.assert_close(ours.compute_summary()["psnr"], psnr.compute(), rtol=1e-6, atol=0)
    expected_psnr = 10 * torch.log10(1 / mse.compute())
    torch.testing.assert_close(ours.compute_summary()["psnr"], expected_psnr, rtol=tolerance, atol=0)


def torchmetrics_psnr_rows() -> list[tuple[str, torch.Tensor, torch.Tensor, object]]:
    """torchmetrics' own PSNR test rows (tests/unittests/image/test_psnr.py, dim=None): integer-valued float images
    with 10 or 5 levels, data_range 10, 5 and (0.0, 1.0); plus the clamping row of issue 15."""
    generator = torch.Generator().manual_seed(42)
    shape = (4, 8, 32, 32)
    inputs = [
        tuple(torch.randint(n, shape, generator=generator, dtype=torch.float32) for n in levels)
        for levels in ((10, 10), (5, 10), (10, 5))
    ]
    rows = [("10/10 levels, 10", *inputs[0], 10), ("5/10 levels, 10", *inputs[1], 10),
            ("10/5 levels, 5", *inputs[2], 5), ("10/10 levels, (0.0, 1.0)", *inputs[0], (0.0, 1.0))]  # fmt: skip
    preds = torch.linspace(0, 1.5, 4 * 3 * 8 * 8).reshape(4, 3, 8, 8)
    return [*rows, ("preds [0, 1.5], target [0.5, 1], (0, 1)", preds, 0.5 + preds / 3, (0, 1))]


@pytest.mark.parametrize("row", torchmetrics_psnr_rows(), ids=lambda row: row[0])
def test_psnr_equals_torchmetrics_for_every_data_range_form(row) -> None:
    from skimage.metrics import peak_signal_noise_ratio

    _, preds, target, data_range = row
    ours, psnr, mse = (
        PerceptionMSE(data_range=data_range),
        PeakSignalNoiseRatio(data_range=data_range),
        MeanSquaredError(),
    )
    for metric in (ours, psnr, mse):
        for part in range(preds.shape[0]):
            metric.update(preds[part], target[part])
    summary = ours.compute_summary()
    torch.testing.assert_close(summary["psnr"].float(), psnr.compute(), rtol=1e-6, atol=0)
    torch.testing.assert_close(summary["pixel"].float(), mse.compute(), rtol=1e-6, atol=0)  # never clamped
    if isinstance(data_range, tuple):  # skimage, as torchmetrics' test uses it: clamp, then the span
        low, high = data_range
        expected = peak_signal_noise_ratio(target.clamp(low, high).double().numpy(),
                                           preds.clamp(low, high).double().numpy(), data_range=high - low)  # fmt: skip
    else:
        expected = peak_signal_noise_ratio(target.double().numpy(), preds.double().numpy(), data_range=data_range)
    assert summary["psnr"].item() == pytest.approx(expected, rel=1e-6)  # float32 differences, as torchmetrics


def test_equals_torchmetrics_float32_defaults() -> None:
    ours, mse, psnr = PerceptionMSE(data_range=2.0), MeanSquaredError(), PeakSignalNoiseRatio(data_range=2.0)
    for preds, target in random_batches(30, (3, 8, 8)):
        for metric in (ours, mse, psnr):
            metric.update(preds * 2, target * 2)
    torch.testing.assert_close(ours.compute().float(), mse.compute(), rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.compute_summary()["psnr"].float(), psnr.compute(), rtol=1e-6, atol=0)


def test_any_split_and_order_gives_the_same_bits() -> None:
    preds, target = torch.rand(24, 3, 20, 20), torch.rand(24, 3, 20, 20)
    results = []
    for trial in range(6):
        order = list(range(24))
        random.Random(trial).shuffle(order)
        cuts = sorted(random.Random(100 + trial).sample(range(1, 24), k=trial))
        metric = PerceptionMSE()
        for start, stop in zip([0, *cuts], [*cuts, 24], strict=True):
            index = torch.tensor(order[start:stop])
            metric.update(preds[index], target[index])
        results.append(metric.compute())
    assert all(torch.equal(results[0], r) for r in results)


def test_result_is_the_correctly_rounded_exact_mse() -> None:
    preds, target = torch.rand(10, 500, dtype=torch.float64), torch.rand(10, 500, dtype=torch.float64)
    metric = PerceptionMSE().set_dtype(torch.float64)
    metric.update(preds, target)
    per_sample = squared_error_sums(preds, target)  # what the metric accumulates, one float64 per sample
    exact = sum(Fraction(v) for v in per_sample.tolist()) / preds.numel()
    assert metric.compute().item() == float(exact)


def test_float64_accumulation_beats_float32_on_1e8_elements() -> None:
    """100 batches of 1e6 elements: torchmetrics' float32 sums drift, the exact state does not."""
    generator = torch.Generator().manual_seed(1)
    preds = torch.rand(10, 100_000, generator=generator)
    target = torch.rand(10, 100_000, generator=generator)
    ours, theirs = PerceptionMSE().set_dtype(torch.float64), MeanSquaredError()
    for _ in range(100):
        ours.update(preds, target)
        theirs.update(preds, target)
    reference = (preds.double() - target.double()).square().mean().item()  # same data 100 times: same mean
    drift_ours = abs(ours.compute().item() - reference) / reference
    drift_theirs = abs(theirs.compute().item() - reference) / reference
    print(f"relative drift over 1e8 elements: pl-pmse {drift_ours:.2e}, torchmetrics MSE {drift_theirs:.2e}")
    assert drift_ours < 1e-7 < drift_theirs
    assert drift_ours * 10 < drift_theirs


def test_exact_accumulator_against_fractions() -> None:
    generator = torch.Generator().manual_seed(2)
    for scale in (5e-324, 1e-310, 1e-300, 1e-5, 1.0, 1e12, 1e300):
        values = torch.rand(3, 257, dtype=torch.float64, generator=generator) * scale
        values[0, :10] = 0
        values[2] *= 1e-20  # rows using different digits, read together by exact_ratios
        bins = exact_bins(values)
        expected = [float(sum(Fraction(v) for v in values[row].tolist()) / 7) for row in range(3)]
        assert [exact_ratio(bins[row], 7) for row in range(3)] == expected
        assert exact_ratios(bins, [7, 7, 7]) == expected
    empty = torch.zeros(NUM_BINS, dtype=torch.int64)
    assert math.isnan(exact_ratio(empty, 0)) and exact_ratio(empty, 1) == 0.0
    huge = exact_bins(torch.full((1, 4), 1.7e308, dtype=torch.float64))[0]
    assert exact_ratio(huge, 1) == math.inf and exact_ratio(huge, 4) == 1.7e308
    # the worst case per bin: 2**32 values cannot overflow int64
    assert int(exact_bins(torch.full((1, 1), 2.0**53 - 1, dtype=torch.float64)).max()) < 2**31


def test_float32_rows_are_summed_first_only_where_float64_sums_them_exactly() -> None:
    exact = lambda values: [sum(map(Fraction, row)) for row in values.double().tolist()]  # noqa: E731
    generator = torch.Generator().manual_seed(4)
    for count in (2, 3, 16, 17, 1000):
        for spread in (0, 8, 20, 24, 28, 31, 60, 140):  # binary orders of magnitude within a row
            exponents = torch.randint(0, spread + 1, (5, count), generator=generator)
            values = (torch.rand(5, count, generator=generator, dtype=torch.float64) * 2.0**-exponents).float()
            values[1, ::3] = 0
            assert exact_sums(exact_bins(values)) == exact(values), (count, spread)
    # At the bound (the largest value 2**room times the smallest) the row is summed first, exactly; one binade more
    # and it is binned value by value (room = 29 - ceil(log2 count) for float32), where float64 could round.
    for dtype, significant in ((torch.float32, 24), (torch.float16, 11), (torch.bfloat16, 8)):
        smallest = 2 - 2.0 ** (1 - significant)  # all its significant bits set
        for count in (2, 3, 17, 1000):
            room = 53 - significant - math.ceil(math.log2(count))
            for above, presummed in ((room, True), (room + 1, False)):
                if smallest * 2.0**above > torch.finfo(dtype).max:
                    continue
                values = torch.tensor([[smallest] + [smallest * 2.0**above] * (count - 1)]).to(dtype)
                assert _exact_row_sums(values).shape[1] == (1 if presummed else count), (dtype, count, above)
                assert exact_sums(exact_bins(values)) == exact(values), (dtype, count, above)
    low = 2 - 2.0**-23
    beyond = torch.tensor([[low] + [low * 2.0**20] * 999])  # float32, count 1000: room 19, this is 20
    assert Fraction(beyond.double().sum().item()) != exact(beyond)[0]  # float64 rounds it: the bound is needed
    assert exact_sums(exact_bins(beyond)) == exact(beyond)


def test_forward_returns_the_batch_value_with_gradient() -> None:
    metric = PerceptionMSE().set_dtype(torch.float64)
    first = (torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4))
    metric.update(*first)
    preds = torch.rand(3, 3, 4, 4, requires_grad=True)
    target = torch.rand(3, 3, 4, 4)
    batch_value = metric(preds, target)
    batch_value.backward()
    assert preds.grad is not None and preds.grad.abs().sum() > 0
    torch.testing.assert_close(batch_value.detach(), (preds.detach() - target).double().square().mean())
    reference = PerceptionMSE().set_dtype(torch.float64)
    reference.update(*first)
    reference.update(preds.detach(), target)
    torch.testing.assert_close(metric.compute(), reference.compute(), rtol=1e-7, atol=0)
    assert metric.update_count == 2


def test_compute_before_update_warns_and_returns_nan() -> None:
    metric = PerceptionMSE(data_range=1.0)
    with pytest.warns(UserWarning, match="no sample accumulated"):
        assert metric.compute().isnan()
    with pytest.warns(UserWarning, match="no sample accumulated"):
        summary = metric.compute_summary()
    assert summary["pixel"].isnan() and summary["psnr"].isnan()


def test_empty_batches_are_a_no_op() -> None:
    metric = PerceptionMSE()
    before = metric.totals.clone()
    metric.update(torch.zeros(0, 3, 4, 4), torch.zeros(0, 3, 4, 4))
    assert torch.equal(metric.totals, before)


def test_state_dict_holds_no_network_and_round_trips() -> None:
    metric = PerceptionMSE()
    metric.persistent(True)
    metric.update(torch.rand(3, 5), torch.rand(3, 5))
    state = metric.state_dict()
    assert list(state) == ["totals", "configuration"] and list(metric.parameters()) == []
    assert state["configuration"]["space"] == "pixel (PixelSpace)"
    restored = PerceptionMSE()
    restored.load_state_dict(state)
    assert torch.equal(restored.compute(), metric.compute())


def test_pickle_and_clone() -> None:
    metric = PerceptionMSE(data_range=1.0)
    metric.update(torch.rand(3, 5), torch.rand(3, 5))
    for copy in (pickle.loads(pickle.dumps(metric)), metric.clone()):
        assert torch.equal(copy.compute(), metric.compute())
        copy.update(torch.rand(1, 5), torch.rand(1, 5))
        assert copy.update_count == 2


def test_updates_inside_and_outside_inference_mode() -> None:
    metric = PerceptionMSE()
    with torch.inference_mode():
        metric.update(torch.rand(2, 4), torch.rand(2, 4))
    metric.update(torch.rand(2, 4), torch.rand(2, 4))
    metric.reset()
    with torch.inference_mode():
        metric.update(torch.ones(2, 4), torch.zeros(2, 4))
    assert metric.compute().item() == 1.0
    with torch.inference_mode():
        metric.reset()  # the state is now an inference tensor, which cannot change outside inference mode ...
    assert metric.totals.is_inference()
    metric.update(torch.ones(2, 4), torch.zeros(2, 4))  # ... so this update writes to a new one
    assert metric.compute().item() == 1.0 and not metric.totals.is_inference()


def test_a_loaded_state_is_the_metrics_own() -> None:
    first, second, third = PerceptionMSE(), PerceptionMSE(), PerceptionMSE()
    for metric in (first, second, third):
        metric.persistent(True)
    first.update(torch.ones(2, 4), torch.zeros(2, 4))
    saved = first.state_dict()
    second.load_state_dict(saved)
    third.load_state_dict(saved)
    second.update(torch.full((2, 4), 3.0), torch.zeros(2, 4))  # updates write into the state in place ...
    assert third.compute().item() == 1.0 and second.compute().item() == 5.0  # ... of its own copy only
    assert torch.equal(saved["totals"], first.totals)


def test_merge_state() -> None:
    a, b, both = PerceptionMSE(), PerceptionMSE(), PerceptionMSE()
    for i, (preds, target) in enumerate(random_batches(6, (4, 4))):
        (a if i % 2 else b).update(preds, target)
        both.update(preds, target)
    a.merge_state(b)
    assert torch.equal(a.compute(), both.compute())


def test_reset_and_repr() -> None:
    metric = PerceptionMSE(data_range=(-1, 1))
    metric.update(torch.rand(2, 3), torch.rand(2, 3))
    metric.reset()
    assert metric.update_count == 0 and int(metric.totals.abs().sum()) == 0
    assert "data_range=(-1.0, 1.0)" in repr(metric)


def test_set_dtype_keeps_the_exact_state() -> None:
    metric = PerceptionMSE()
    assert metric.set_dtype(torch.float16) is metric
    metric.update(torch.rand(2, 3), torch.rand(2, 3))
    assert metric.totals.dtype == torch.int64 and metric.compute().dtype == torch.float16  # the results' dtype only


def test_forward_with_grad_stores_the_same_bits_as_update() -> None:
    preds, target = torch.rand(4, 3, 40, 40), torch.rand(4, 3, 40, 40)
    by_update, by_forward = PerceptionMSE(), PerceptionMSE()
    by_update.update(preds, target)
    value = by_forward(preds.clone().requires_grad_(), target)
    assert torch.equal(by_update.totals, by_forward.totals) and value.requires_grad


def some_batch(metric: PerceptionMSE) -> tuple[torch.Tensor, torch.Tensor]:
    if metric.space.modality == "audio":
        return torch.rand(2, 4096) - 0.5, torch.rand(2, 4096) - 0.5
    return torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)


def test_a_state_carries_its_configuration() -> None:
    source = PerceptionMSE("pyramid", levels=3)
    source.persistent(True)
    source.update(*some_batch(source))
    state = source.state_dict()
    same = PerceptionMSE("pyramid", levels=3)
    same.load_state_dict(dict(state))
    assert torch.equal(same.compute(), source.compute())
    legacy = {key: value for key, value in state.items() if key != "configuration"}  # saved before 0.2
    PerceptionMSE("pyramid", levels=3).load_state_dict(legacy)
    size = state["totals"].numel()
    refused = [
        (PerceptionMSE(), state, rf"state size is 75 \(this metric\), {size} \(the other state\)"),
        (PerceptionMSE(), legacy, rf"state size is 75 \(this metric\), {size} \(the other state\)"),
        (PerceptionMSE("pyramid", levels=4), state, r"levels is 4 \(this metric\), 3 \(the other state\)"),
        (PerceptionMSE("mrstft"), state, r"space is mrstft \(MultiResolutionSTFT\) \(this metric\), pyramid"),
        (PerceptionMSE("pyramid", levels=3, data_range=255), state, r"data_range is \(0.0, 255.0\)"),
    ]
    for other, saved, pattern in refused:
        other.update(*some_batch(other))
        before, count = other.totals.clone(), other.update_count
        with pytest.raises(ValueError, match=pattern):
            other.load_state_dict(dict(saved))
        assert torch.equal(other.totals, before) and other.update_count == count


def test_merge_state_refuses_other_configurations_and_itself() -> None:
    first, second = PerceptionMSE(data_range=1.0), PerceptionMSE(data_range=1.0)
    batches = [some_batch(first) for _ in range(2)]
    first.update(*batches[0])
    second.update(*batches[1])
    waveform, other_range = PerceptionMSE("waveform", data_range=1.0), PerceptionMSE(data_range=255)
    for other in (waveform, other_range):
        other.update(*some_batch(other))
    refused = [(waveform, "space is pixel"), (other_range, "data_range is"), (first, "merged with itself"),
               ({"totals": torch.zeros(3, dtype=torch.int64)}, r"state size is 75 \(this metric\), 3")]  # fmt: skip
    for other, pattern in refused:
        before = first.totals.clone()
        with pytest.raises(ValueError, match=pattern):
            first.merge_state(other)
        assert torch.equal(first.totals, before)
    first.merge_state(second)
    reference = PerceptionMSE(data_range=1.0)
    for batch in batches:
        reference.update(*batch)
    assert torch.equal(first.compute(), reference.compute())


def test_raw_values_far_outside_the_range_warn_once_per_metric() -> None:
    metric = PerceptionMSE("pixel")
    with pytest.warns(UserWarning, match=r"assumes values in \[0, 1\] .* found \[.*\].*data_range=255 for 8-bit"):
        metric.update(torch.rand(2, 3, 8, 8) * 255, torch.rand(2, 3, 8, 8) * 255)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metric.update(torch.rand(2, 3, 8, 8) * 255, torch.rand(2, 3, 8, 8) * 255)  # once per metric
        PerceptionMSE("pixel", data_range=255).update(torch.rand(2, 3, 8, 8) * 255, torch.rand(2, 3, 8, 8))
        PerceptionMSE("waveform").update(torch.rand(2, 99) * 1.2 - 0.6, torch.rand(2, 99) * 2 - 1)  # overshoot: fine
    with pytest.warns(UserWarning, match=r"space 'waveform' assumes values in \[-1, 1\].*16-bit audio"):
        PerceptionMSE("waveform").update(torch.rand(2, 99) * 30000, torch.rand(2, 99))


def test_lpips_spaces_need_the_data_range_stated(backbone_weights: dict[str, str]) -> None:
    from pl_pmse import PerceptionMSECallback, perception_mse

    path = backbone_weights["squeezenet"]
    for build in (lambda: PerceptionMSE("lpips-squeeze", weights=path),
                  lambda: PerceptionMSECallback("lpips-squeeze", weights=path),
                  lambda: perception_mse(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32), "lpips-squeeze",
                                         weights=path)):  # fmt: skip
        with pytest.raises(ValueError, match=r"data_range: .* \[-1, 1\] .* data_range=\(-1, 1\).* data_range=1.0"):
            build()
    a = perception_mse(torch.zeros(1, 3, 32, 32), torch.ones(1, 3, 32, 32), "lpips-squeeze", weights=path,
                       data_range=(-1, 1))  # fmt: skip
    b = perception_mse(torch.full((1, 3, 32, 32), 0.5), torch.ones(1, 3, 32, 32), "lpips-squeeze", weights=path,
                       data_range=1.0)  # fmt: skip
    torch.testing.assert_close(a, b)  # 0 in [-1, 1] is 0.5 in [0, 1]


def test_spaces_built_alike_have_one_configuration() -> None:
    """Options are compared as the values in use: hop_length=None is n_fft // 4, a list is a tuple."""
    mel = {"space": "mel", "sample_rate": 16000}
    pairs = [
        (PerceptionMSE(**mel), PerceptionMSE(**mel, hop_length=256, f_max=8000)),
        (PerceptionMSE("mrstft", fft_sizes=[512, 1024]),
         PerceptionMSE("mrstft", fft_sizes=(512, 1024), hop_sizes=(128, 256))),
    ]  # fmt: skip
    for first, second in pairs:
        assert first.configuration() == second.configuration()
        first.update(*some_batch(first))
        second.update(*some_batch(second))
        first.merge_state(second)
    other = PerceptionMSE("mel", sample_rate=16000, hop_length=64).configuration()
    assert other["hop_length"] == "64" and other != pairs[0][0].configuration()


def test_batch_stats_then_accumulate_is_update_and_shows_the_per_sample_results() -> None:
    preds, target = torch.rand(6, 3, 32, 32), torch.rand(6, 3, 32, 32)
    mask = torch.tensor([True, False, True, True, False, True])
    for options in ({}, {"validate_args": False}):
        updated, accumulated = (PerceptionMSE("pyramid", data_range=1.0, **options) for _ in range(2))
        updated.update(preds, target, mask)
        batch = accumulated.batch_stats(preds, target, mask)
        assert accumulated.totals.count_nonzero() == 0  # measured, not yet accumulated
        accumulated.accumulate(batch)
        assert torch.equal(updated.totals, accumulated.totals) and accumulated._update_count == 1
        per_sample = batch.stats.total(accumulated.space.component_weights)[batch.stats.valid]
        expected = perception_mse(preds[mask], target[mask], "pyramid", reduction="none", data_range=1.0)
        assert torch.allclose(per_sample.float(), expected, rtol=1e-6)


def test_accumulate_refuses_what_this_metric_did_not_measure() -> None:
    metric, other = PerceptionMSE("pixel"), PerceptionMSE("pixel", data_range=1.0)
    batch = other.batch_stats(torch.rand(2, 4), torch.rand(2, 4))
    for wrong in (batch, metric.space):
        with pytest.raises(ValueError, match=r"batch: expected the result of batch_stats\(\) of this PerceptionMSE"):
            metric.accumulate(wrong)
    assert metric.totals.count_nonzero() == 0 and metric._update_count == 0


def test_the_configuration_hashes_a_network_once_per_state_of_its_weights(monkeypatch, backbone_weights) -> None:
    """Building metrics on one space, or checking them again, hashes the weights once (a wav2vec2 large took 1.4 s
    per metric); any change of the weights (in place, a cast, a load) is seen."""
    import zlib

    from pl_pmse.spaces import base, get_space

    hashed, crc32 = [], zlib.crc32
    monkeypatch.setattr(base.zlib, "crc32", lambda data, start=0: hashed.append(len(data)) or crc32(data, start))
    space = get_space("squeezenet", weights=backbone_weights["squeezenet"])
    first = [PerceptionMSE(space).configuration() for _ in range(3)]
    weights = len(space.tensors())
    assert len(hashed) == weights + 3 and first[0] == first[1] == first[2]  # + each metric's own checksum text
    with torch.no_grad():
        space.tensors()[0][0].add_(1.0)  # in place: the version counter moves
    changed = PerceptionMSE(space).configuration()
    assert len(hashed) == 2 * weights + 4 and changed["tensors"] != first[0]["tensors"]
    space.set_dtype(torch.float64)  # a cast: new storage
    assert PerceptionMSE(space).configuration()["tensors"] not in (first[0]["tensors"], changed["tensors"])
