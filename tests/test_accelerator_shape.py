"""Shaped for the GPU: kernel launches per update counted under fake CUDA, and the accelerator path (exact integer
words, whole-batch kernels) run on the CPU against exact references."""

from __future__ import annotations

import importlib.util
import math
import warnings
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torchmetrics

from pl_pmse import PerceptionMSE, exact, perception_mse, reduction
from pl_pmse.exact import NUM_BINS, add_exact, add_fixed, exact_sums, host_bins
from tests.torch_support import needs_fake_cuda

_COMMON = importlib.util.spec_from_file_location("benchmark_common", Path(__file__).parents[1] / "benchmarks/common.py")
benchmark_common = importlib.util.module_from_spec(_COMMON)
_COMMON.loader.exec_module(benchmark_common)

RANDOM = {"weights": "random"}
# (space, options, the two sizes compared, the most launches allowed beyond the space's own features)
LAUNCH_CASES = [
    ("pixel", {}, (64, 1024), 40),
    ("pyramid", {}, (64, 1024), 300),
    ("waveform", {}, (16000, 160000), 40),
    ("mel", {"sample_rate": 16000}, (16000, 160000), 40),
    ("mrstft", {}, (16000, 64000), 40),
    ("audio-aspects", {"sample_rate": 16000}, (16000, 160000), 40),
    ("hubert", {"sample_rate": 16000, **RANDOM}, (16000, 64000), 60),  # 9 components: 42
    ("hubert", {"sample_rate": 8000, "layers": [1], **RANDOM}, (16000, 64000), 40),  # resampled in the space
    ("vgg16", RANDOM, (64, 1024), 40),
    ("alexnet", RANDOM, (64, 1024), 40),
    ("squeezenet", RANDOM, (64, 1024), 40),
    ("lpips-alex", {**RANDOM, "data_range": 1.0}, (64, 1024), 40),
    ("lpips-vgg", {**RANDOM, "data_range": 1.0}, (64, 1024), 40),
    ("lpips-squeeze", {**RANDOM, "data_range": 1.0}, (64, 1024), 40),
]


def _shape(size: int) -> tuple[int, ...]:
    return (16, size) if size >= 16000 else (16, 3, size, size)


@needs_fake_cuda
@pytest.mark.parametrize(("name", "options", "sizes", "allowed"), LAUNCH_CASES, ids=[c[0] for c in LAUNCH_CASES])
def test_launches_per_update_do_not_grow_with_the_input(name, options, sizes, allowed) -> None:
    """One update with validate_args=False on CUDA, counted under fake CUDA: the same count at both sizes, and at
    most ``allowed`` beyond the space's own features (a weight-free space's features are its measurement)."""
    warnings.filterwarnings("ignore", message=".*data_ptr.*")
    update = lambda m, p, t: m.update(p, t)  # noqa: E731
    counts = [benchmark_common.fake_cuda_launches(PerceptionMSE(name, validate_args=False, **options), _shape(s),
                                                  update) for s in sizes]  # fmt: skip
    assert counts[0] == counts[1], counts
    space = PerceptionMSE(name, **options).space
    features = 0
    if space.networks() or not space.exact_features:
        features = benchmark_common.fake_cuda_launches(
            PerceptionMSE(name, **options), _shape(sizes[0]), lambda m, p, t: m.space.features(torch.cat([p, t]))
        )
    assert counts[0] - features <= allowed, (counts[0], features)
    reference = benchmark_common.fake_cuda_launches(torchmetrics.MeanSquaredError(), _shape(sizes[0]), update)
    assert reference <= 6  # the counter sees torchmetrics' few kernels: it counts what it claims to


@needs_fake_cuda
@pytest.mark.parametrize("figure", ["mcd", "image fidelity"])
def test_the_set_figures_update_reads_nothing_back_on_an_accelerator(figure) -> None:
    """MelCepstralDistortion's and ImageFidelity's updates under fake CUDA (a host read or a data-dependent shape would
    raise there), the same launches at both sizes. With ``nan_strategy="ignore"`` (the callback's ``accumulate`` path
    too): ``"error"`` and ``"warn"`` read back whether a sample is non-finite, as PerceptionMSE's checks do."""
    from pl_pmse import ImageFidelity, MelCepstralDistortion

    warnings.filterwarnings("ignore", message=".*data_ptr.*")
    build, shapes = {"mcd": (lambda: MelCepstralDistortion(16000, "ignore"), ((4, 16000), (4, 64000))),
                     "image fidelity": (lambda: ImageFidelity(nan_strategy="ignore"),
                                        ((4, 3, 32, 32), (4, 3, 128, 128)))}[figure]  # fmt: skip
    counts = [benchmark_common.fake_cuda_launches(build(), shape, lambda m, p, t: m.update(p, t)) for shape in shapes]
    assert counts[0] == counts[1] > 0, counts


@pytest.fixture
def accelerator_path(monkeypatch):
    """The CPU runs the code an accelerator runs: integer words, whole-batch kernels, no host-side binning."""
    monkeypatch.setattr(reduction, "works_in_cache_blocks", lambda device: False)
    monkeypatch.setattr(exact, "on_host", lambda device, count: False)
    monkeypatch.setattr("pl_pmse.metric.on_host", lambda device, count: False)


def _squares(x: torch.Tensor) -> list[Fraction]:
    """The float64 squares, exactly (exact squares for float32 values; float64 values' squares round once)."""
    return [Fraction(v * v) for v in x.double().flatten().tolist()]


def test_fixed_point_words_are_exact_sums_of_truncated_squares_close_to_the_true_sum() -> None:
    torch.manual_seed(0)
    cases = [
        torch.randn(3, 1000),
        torch.randn(2, 5000) * torch.logspace(-30, 30, 5000),  # magnitudes across 60 decades in one sample
        torch.cat([torch.full((1, 999), 1e-3), torch.full((1, 1), 1e3)], 1),  # one dominant outlier
        torch.zeros(2, 7),
        torch.randn(2, 64, dtype=torch.float64) * 1e-100,  # tiny float64 squares
        torch.randn(2, 64, dtype=torch.float64) * 1e150,  # huge float64 squares
    ]
    for x in cases:
        sums = reduction.fixed_point_square_sums([x])
        everyone = torch.ones(x.shape[0], dtype=torch.bool)
        bins = add_fixed(torch.zeros(1, NUM_BINS, dtype=torch.int64), sums.words, sums.digit, everyone)
        held = exact_sums(bins)[0]
        words = sum(Fraction(w) * Fraction(2) ** (30 * (int(d) - j) - 1126)
                    for row, ds in zip(sums.words.tolist(), sums.digit.tolist(), strict=True)
                    for ws, d in zip(row, ds, strict=True) for j, w in enumerate(ws))  # fmt: skip
        assert held == words  # the state holds the words exactly
        for i in range(x.shape[0]):
            squares = _squares(x[i])
            true, largest = sum(squares, Fraction(0)), max(squares)
            truncated = sum(Fraction(w) * Fraction(2) ** (30 * (int(sums.digit[i, 0]) - j) - 1126)
                            for j, w in enumerate(sums.words[i, 0].tolist()))  # fmt: skip
            assert true - truncated >= 0 and true - truncated <= x[i].numel() * largest * Fraction(2) ** -58
            assert math.isclose(float(sums.values[i, 0]), float(true), rel_tol=1e-14, abs_tol=0)


def test_fixed_point_words_of_a_sample_do_not_depend_on_its_batch() -> None:
    torch.manual_seed(1)
    x = torch.randn(9, 3, 17, 19) * torch.logspace(-3, 3, 9)[:, None, None, None]
    whole = reduction.fixed_point_square_sums([x, x[:, :1]])
    for i in range(9):
        single = reduction.fixed_point_square_sums([x[i : i + 1], x[i : i + 1, :1]])
        assert torch.equal(single.words[0], whole.words[i]) and torch.equal(single.values[0], whole.values[i])


def test_non_finite_squares_give_non_finite_values_and_are_left_out() -> None:
    x = torch.randn(4, 10)
    x[1, 3], x[2, 0] = math.nan, math.inf
    values = reduction.fixed_point_square_sums([x]).values[:, 0]
    assert torch.isfinite(values[[0, 3]]).all() and not torch.isfinite(values[[1, 2]]).any()
    huge = torch.tensor([[2.0**501], [2.0**502]], dtype=torch.float64)  # the documented limit: squares of 2**1004
    values = reduction.fixed_point_square_sums([huge]).values[:, 0]
    assert values[0] == 2.0**1002 and values[1].isnan()


def test_host_binning_writes_the_bins_the_tensor_binning_writes() -> None:
    torch.manual_seed(2)
    values = torch.rand(3, 20, dtype=torch.float64) * 10.0 ** torch.randint(-310, 305, (3, 20)).double()
    values[0, :6] = torch.tensor([0.0, 5e-324, 2.0**-1022, 1.1e-308, 1.7e308, 1.0], dtype=torch.float64)
    tensor_bins = torch.zeros(3, NUM_BINS, dtype=torch.int64)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(exact, "on_host", lambda device, count: False)
        add_exact(tensor_bins, values)
    assert torch.tensor(host_bins(values.tolist())).view(3, NUM_BINS).equal(tensor_bins)


@pytest.mark.parametrize("space", ["pixel", "pyramid", "waveform"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_the_accelerator_path_gives_the_same_state_for_any_batch_split(accelerator_path, space, dtype) -> None:
    torch.manual_seed(3)
    shape = (11, 2000) if space == "waveform" else (11, 3, 40, 36)
    preds, target = torch.rand(shape).to(dtype), torch.rand(shape).to(dtype)
    states, values = [], []
    for split in ([11], [5, 6], [1] * 11, [3, 0, 8]):
        metric = PerceptionMSE(space, data_range=(0.0, 1.0), validate_args=split != [5, 6])
        for part_preds, part_target in zip(preds.split(split), target.split(split), strict=True):
            metric.update(part_preds, part_target)
        states.append(metric.totals)
        values.append(metric.compute_summary())
    assert all(torch.equal(state, states[0]) for state in states)
    with pytest.MonkeyPatch.context() as patch:  # the CPU's own path: equal to float32 rounding
        patch.setattr(reduction, "works_in_cache_blocks", lambda device: True)
        cpu = PerceptionMSE(space, data_range=(0.0, 1.0))
        cpu.update(preds, target)
        for key, value in cpu.compute_summary().items():
            torch.testing.assert_close(values[0][key], value, rtol=1e-6, atol=0)


def test_the_accelerator_path_skips_non_finite_samples_as_the_cpu_path_does(accelerator_path) -> None:
    preds, target = torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16)
    preds[2, 0, 0, 0] = math.nan
    metric = PerceptionMSE(validate_args=False, nan_strategy="ignore")
    metric.update(preds, target)
    clean = PerceptionMSE()
    clean.update(preds[[0, 1, 3]], target[[0, 1, 3]])
    summary = metric.compute_summary()
    assert summary["skipped"] == 1
    torch.testing.assert_close(summary["total"], clean.compute(), rtol=1e-6, atol=0)


@needs_fake_cuda
def test_inputs_on_another_device_are_refused_before_anything_changes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    metric = PerceptionMSE("squeezenet", weights="random")
    metric.update(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32))
    state, count = metric.totals.clone(), metric._update_count
    with FakeTensorMode(allow_non_fake_inputs=True):  # CUDA tensors without a GPU
        preds, target = torch.rand(2, 3, 32, 32, device="cuda"), torch.rand(2, 3, 32, 32, device="cuda")
        with pytest.raises(ValueError, match=r"are on cuda:0 but the PerceptionMSE state is on cpu; move the metric"):
            metric.update(preds, target)
        with pytest.raises(ValueError, match=r"the network of space 'squeezenet' is on cpu"):  # the loss, a CPU space
            perception_mse(preds, target, metric.space)
    assert torch.equal(metric.totals, state) and metric._update_count == count


def test_casts_never_reach_the_exact_state_and_half_states_are_refused() -> None:
    metric = PerceptionMSE()
    for cast in (metric.half, metric.bfloat16, lambda: metric.to(torch.float16), lambda: metric.type(torch.half)):
        cast()
        assert metric.totals.dtype == torch.int64
    with pytest.raises(ValueError, match="must be a 1-D int64 tensor"):
        metric.load_state_dict({"totals": metric.totals.half()}, strict=False)
    with pytest.raises(ValueError, match="Apple's MPS device has no float64"):
        metric.to("mps")
    assert metric.totals.device.type == "cpu"


def test_mps_inputs_are_refused_with_the_reason() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    metric = PerceptionMSE()
    with FakeTensorMode(allow_non_fake_inputs=True):  # MPS tensors on a machine without one
        preds = torch.rand(2, 3, 8, 8, device="mps")
        for call in (lambda: metric.update(preds, preds), lambda: perception_mse(preds, preds)):
            with pytest.raises(ValueError, match="preds and target: Apple's MPS device has no float64"):
                call()
    assert not metric.totals.any()
