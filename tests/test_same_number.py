"""The same number on every machine, precision and thread: integers measured exactly, spaces in their own precision,
spaces shared by threads, states that can be trusted."""

from __future__ import annotations

import math
import random
import threading
from fractions import Fraction

import pytest
import torch

from pl_pmse import PerceptionMSE, perception_mse
from pl_pmse.reduction import integer_squared_error_parts
from tests.torch_support import needs_fullgraph_compile

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
    metric = PerceptionMSE(data_range=(info.min, info.max)).set_dtype(torch.float64)
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
    checked = PerceptionMSE(data_range=(low, high)).set_dtype(torch.float64)
    unchecked = PerceptionMSE(data_range=(low, high), validate_args=False).set_dtype(torch.float64)
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
        with pytest.raises(ValueError, match="preds and target: the meta device"):
            call()
    assert metric.update_count == 0


def _image_pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    target = torch.rand(2, 3, 32, 32, generator=generator)
    return (target + 0.1 * torch.randn(target.shape, generator=generator)).clamp(0, 1), target


def _full_scale_audio() -> tuple[torch.Tensor, torch.Tensor]:
    """A full-scale 500 Hz sine (its mel power overflows float16) and a noisy copy."""
    time = torch.arange(16000) / 16000
    target = torch.sin(2 * math.pi * 500 * time).expand(2, -1).clone()
    noise = 0.05 * torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    return (target + noise).clamp(-1, 1), target


# every built-in space: (name, options, inputs, data_range)
BUILT_IN_SPACES = [
    ("pixel", {}, _image_pair, None),
    ("pyramid", {"levels": 3}, _image_pair, None),
    ("vgg16", {"weights": "random"}, _image_pair, None),
    ("alexnet", {"weights": "random"}, _image_pair, None),
    ("squeezenet", {"weights": "random"}, _image_pair, None),
    ("lpips-alex", {"weights": "random"}, _image_pair, 1.0),
    ("lpips-vgg", {"weights": "random"}, _image_pair, 1.0),
    ("lpips-squeeze", {"weights": "random"}, _image_pair, 1.0),
    ("waveform", {}, _full_scale_audio, None),
    ("mel", {"sample_rate": 16000}, _full_scale_audio, None),
    ("mrstft", {"fft_sizes": (256, 512)}, _full_scale_audio, None),
    ("audio-aspects", {"sample_rate": 16000}, _full_scale_audio, None),
    ("hubert", {"sample_rate": 16000, "weights": "random", "layers": [1, 2]}, _full_scale_audio, None),
]


@pytest.fixture(scope="module")
def built_spaces() -> dict[str, object]:
    from pl_pmse.spaces import get_space

    return {name: get_space(name, **options) for name, options, _, _ in BUILT_IN_SPACES}


@pytest.mark.parametrize(
    ("name", "options", "inputs", "data_range"), BUILT_IN_SPACES, ids=[s[0] for s in BUILT_IN_SPACES]
)
def test_autocast_never_reaches_a_space(name, options, inputs, data_range, built_spaces) -> None:
    """Under CPU autocast in float16 and bfloat16 (Lightning's 16-mixed / bf16-mixed; CUDA's autocast is disabled
    the same way), the metric and the loss give the float32 value of the same inputs, bit for bit."""
    space = built_spaces[name]
    preds, target = inputs()

    def measured() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        metric = PerceptionMSE(space, data_range=data_range)
        metric.update(preds, target)
        loss = perception_mse(preds, target, space, data_range=data_range)
        unchecked = perception_mse(preds, target, space, data_range=data_range, validate_args=False)
        return metric.compute(), loss, unchecked

    expected = measured()
    assert all(torch.isfinite(value) for value in expected)
    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype):
            got = measured()
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)), (dtype, got, expected)


@pytest.mark.parametrize("name", ["mel", "vgg16"])
def test_gradients_flow_into_a_half_precision_graph_under_autocast(name: str, built_spaces) -> None:
    space = built_spaces[name]
    preds, target = _full_scale_audio() if name == "mel" else _image_pair()
    channels = 1 if name == "mel" else 3
    layer = (torch.nn.Conv1d if name == "mel" else torch.nn.Conv2d)(channels, channels, 1)  # identity 1x1 conv
    with torch.no_grad():
        layer.weight.copy_(torch.eye(channels).view_as(layer.weight))
        layer.bias.zero_()
    x = preds[:, None] if name == "mel" else preds
    with torch.autocast("cpu", dtype=torch.float16):
        output = layer(x)  # float16: the user's half-precision graph
        assert output.dtype == torch.float16
        output = output[:, 0] if name == "mel" else output
        loss = perception_mse(output, target, space)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert (
        layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0
    )


def test_lpips_normalises_half_precision_features_in_float32(built_spaces) -> None:
    """A half-precision LPIPS space (set_dtype) normalises in float32: a zero feature vector stays finite (the 1e-10
    epsilon is 0 in float16) and features beyond 256 do not overflow the squared norm."""
    space = built_spaces["lpips-alex"]
    features = torch.zeros(1, 64, 2, 2, dtype=torch.float16)
    features[0, :, 0, 0] = 300.0  # |f|**2 = 64 * 90000: beyond float16's 65504
    normalized = space.transform("relu1", features)
    assert normalized.dtype == torch.float32 and torch.isfinite(normalized).all()
    expected = space.lpips_scale_relu1.float() / 8.0  # f / |f| = 1/8 per channel, times the calibration scale
    torch.testing.assert_close(normalized[0, :, 0, 0], expected[0, :, 0, 0])
    assert normalized[0, :, 1, 1].abs().sum() == 0


def test_the_error_profile_is_measured_in_float32_under_autocast() -> None:
    from pl_pmse import ErrorProfile

    cases = ((ErrorProfile("image", 1.0, grid=4, bands=8), _image_pair()),
             (ErrorProfile("audio", sample_rate=16000, n_fft=256, n_mels=16), _full_scale_audio()))  # fmt: skip
    for profile, (preds, target) in cases:
        profile.update(preds, target)
        expected = profile.compute()
        for dtype in (torch.float16, torch.bfloat16):
            profile.reset()
            with torch.autocast("cpu", dtype=dtype):
                profile.update(preds, target)
            assert all(torch.equal(profile.compute()[key], expected[key]) for key in expected)


def test_own_precision_turns_tf32_off_and_restores_the_callers_setting_when_the_last_measurement_ends() -> None:
    """The flags are process settings, so this runs without a GPU; tests/test_cuda.py measures on one. On torch
    before 2.9 the legacy flags (``allow_tf32``, ``float32_matmul_precision``) are the ones set and restored."""
    from pl_pmse.precision import _SETTINGS, own_precision

    def current() -> list[object]:
        return [read() for read, _, _ in _SETTINGS]

    full = [value for _, _, value in _SETTINGS]
    before = current()
    try:
        torch.set_float32_matmul_precision("high")  # TF32 for cuBLAS and oneDNN, as Lightning suggests
        if hasattr(torch.backends.cudnn, "conv"):
            torch.backends.cudnn.conv.fp32_precision = "tf32"  # cuDNN's default
        else:
            torch.backends.cudnn.allow_tf32 = True  # cuDNN's default, the legacy flag
        callers = current()
        assert callers != full
        first, second = own_precision(torch.device("cuda")), own_precision(torch.device("cpu"))
        first.__enter__()
        second.__enter__()  # another thread's measurement overlapping the first
        assert current() == full
        assert not torch.is_autocast_enabled("cuda")
        first.__exit__(None, None, None)  # the second is still measuring: full precision stays
        assert current() == full
        second.__exit__(None, None, None)
        assert current() == callers
    finally:
        for (_, write, _), value in reversed(list(zip(_SETTINGS, before, strict=True))):
            write(value)


@needs_fullgraph_compile
def test_a_space_named_in_a_compiled_loss_traces_without_a_graph_break() -> None:
    preds, target = _image_pair()
    loss = lambda p, t: perception_mse(p, t, "pyramid", validate_args=False, levels=3)  # noqa: E731
    expected = loss(preds, target)  # the cache is warm
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(preds, target), expected, rtol=1e-6, atol=0)


def test_empty_and_mixed_integer_batches_with_a_clamped_psnr() -> None:
    metric = PerceptionMSE(data_range=(0, 255)).set_dtype(torch.float64)
    empty = torch.zeros(0, 1, 2, 2, dtype=torch.uint8)
    metric.update(empty, empty)  # a rank's last batch that held only padding repeats
    metric.update(torch.ones(1, 1, 2, 2, dtype=torch.uint8), torch.ones(1, 1, 2, 2, dtype=torch.uint8),
                  mask=torch.tensor([False]))  # fmt: skip
    assert metric.totals.abs().sum() == 0
    mixed = PerceptionMSE(data_range=(-1000, 1000)).set_dtype(torch.float64)
    zeros, negative = torch.zeros(1, 4, dtype=torch.uint8), torch.full((1, 4), -500, dtype=torch.int16)
    for preds, target in ((zeros, negative), (negative, zeros)):
        mixed.reset()
        mixed.update(preds, target)
        assert mixed.compute_summary()["psnr"].item() == pytest.approx(10 * math.log10(2000**2 / 500**2), rel=1e-12)


def test_random_weights_ignore_the_default_device_and_keep_a_callers_own_generator() -> None:
    from pl_pmse.spaces.backbones import _PrivateGenerator, load_backbone

    expected = load_backbone("squeezenet", "random").features[0].weight
    with torch.device("meta"):  # a default device of the caller's (cuda on a GPU machine)
        built = load_backbone("squeezenet", "random")
    assert built.features[0].weight.device.type == "cpu" and torch.equal(built.features[0].weight, expected)
    with _PrivateGenerator(torch.Generator().manual_seed(1)):  # an op taking its generator by position
        given = torch.poisson(torch.full((5,), 4.0), generator=torch.Generator().manual_seed(0))
    assert torch.equal(given, torch.poisson(torch.full((5,), 4.0), generator=torch.Generator().manual_seed(0)))


def test_a_model_holding_a_mel_space_loads_its_0_1_checkpoint_strictly() -> None:
    from pl_pmse.spaces import get_space

    holder = torch.nn.Module()
    holder.space = get_space("mel", sample_rate=16000)
    assert list(holder.state_dict()) == []  # constants of the options: not saved
    saved_by_0_1 = {"space.transform.spectrogram.window": torch.hann_window(1024),
                    "space.transform.mel_scale.fb": torch.zeros(513, 80)}  # fmt: skip
    holder.load_state_dict(saved_by_0_1, strict=True)


def _hammer(calls: list, threads: int = 2) -> list:
    """Run ``calls`` (functions of no argument) from ``threads`` threads at once; their results in order."""
    from concurrent.futures import ThreadPoolExecutor

    barrier = threading.Barrier(threads)

    def run(part: int) -> list:
        barrier.wait()
        return [(index, call()) for index, call in enumerate(calls) if index % threads == part]

    with ThreadPoolExecutor(threads) as pool:
        results = [item for chunk in pool.map(run, range(threads)) for item in chunk]
    return [value for _, value in sorted(results, key=lambda item: item[0])]


def test_one_network_space_used_from_two_threads_gives_each_call_its_own_features(built_spaces) -> None:
    space = built_spaces["squeezenet"]
    inputs = [_image_pair(seed) for seed in range(6)]
    expected = [perception_mse(p, t, space) for p, t in inputs]
    expected_named = [perception_mse(p, t, "squeezenet", weights="random") for p, t in inputs]
    assert torch.equal(expected[0], expected_named[0])  # the cached named space is built alike
    calls = [lambda i=i: perception_mse(*inputs[i % 6], space) for i in range(60)]
    calls += [lambda i=i: perception_mse(*inputs[i % 6], "squeezenet", weights="random") for i in range(60)]
    results = _hammer(calls)
    wrong = [i for i, value in enumerate(results) if not torch.equal(value, expected[i % 6])]
    assert not wrong, f"{len(wrong)} of {len(results)} calls returned another call's value"


def test_random_weights_built_in_threads_are_the_sequential_ones_and_leave_the_global_rng_alone() -> None:
    from pl_pmse.spaces.backbones import load_backbone

    sequential = load_backbone("alexnet", "random").features[0].weight.clone()
    torch.manual_seed(5)
    alone = [torch.rand(10_000) for _ in range(400)]  # what another thread draws when nobody builds weights

    def draws() -> list[torch.Tensor]:
        return [torch.rand(10_000) for _ in range(400)]

    torch.manual_seed(5)
    results = _hammer([draws, lambda: load_backbone("alexnet", "random").features[0].weight,
                       lambda: load_backbone("alexnet", "random").features[0].weight], threads=3)  # fmt: skip
    assert torch.equal(results[1], sequential) and torch.equal(results[2], sequential)
    assert all(torch.equal(a, b) for a, b in zip(results[0], alone, strict=True))  # nothing drew from it, or reset it


def _tampered_states(state: torch.Tensor) -> list[tuple[str, object, str]]:
    """(what, totals, the error it must give) for every way a state can be untrustworthy."""
    negative_bin, negative_count = state.clone(), state.clone()
    negative_bin[3] = -1
    negative_count[-1] = -2
    return [
        ("float64", state.double(), r"must be a 1-D int64 tensor .* got a torch.float64 tensor of shape \(75,\)"),
        ("float32", state.float(), r"got a torch.float32 tensor"),
        ("2-D", state[None], r"1-D int64 tensor .* shape \(1, 75\)"),
        ("negative bin", negative_bin, r"negative entries at \[3\]"),
        ("negative count", negative_count, r"negative entries at \[74\]"),
        ("not a tensor", [0] * 75, r"expected the state 'totals' as a tensor"),
    ]


def test_load_state_dict_and_merge_state_accept_only_a_state_the_metric_could_have_written() -> None:
    source = PerceptionMSE(data_range=1.0)
    source.persistent(True)
    source.update(*_image_pair())
    saved = source.state_dict()
    for what, totals, pattern in _tampered_states(saved["totals"]):
        metric = PerceptionMSE(data_range=1.0)
        metric.update(*_image_pair(3))
        before, expected = metric.totals.clone(), metric.compute()
        for call, given in (
            (metric.load_state_dict, {**saved, "totals": totals}),
            (metric.merge_state, {"totals": totals}),
        ):
            with pytest.raises((ValueError, TypeError), match=pattern):
                call(given)
            assert torch.equal(metric.totals, before) and torch.equal(metric.compute(), expected), what
        other = PerceptionMSE(data_range=1.0)
        if isinstance(totals, torch.Tensor):
            other.totals = totals
            with pytest.raises((ValueError, TypeError), match=pattern):
                metric.merge_state(other)
            assert torch.equal(metric.totals, before), what
    metric = PerceptionMSE(data_range=1.0)
    metric.load_state_dict(saved)  # the metric's own state is still taken
    assert torch.equal(metric.compute(), source.compute())


def test_a_space_with_0_dim_buffers_configures_and_checks_its_state() -> None:
    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1)
            self.register_buffer("scale", torch.tensor(2.0))  # a 0-dim buffer
            self.register_buffer("steps", torch.tensor(7))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) * self.scale

    metric = PerceptionMSE(Scaled(), layers=["conv"], normalize="none")
    assert metric.configuration()["tensors"].startswith(
        "6 tensors, 20 values"
    )  # conv 12 + 4, the 0-dim 2, gain and bias 2
    metric.persistent(True)
    metric.update(*_image_pair())
    restored = PerceptionMSE(metric.space, data_range=None)
    restored.load_state_dict(metric.state_dict())
    assert torch.equal(restored.compute(), metric.compute())


@pytest.mark.parametrize("world", [2, 3])
def test_worst_k_ties_are_broken_alike_for_any_world_size(world: int) -> None:
    """Equal values (identical crops, clipped errors) are common; the k worst must not depend on which rank saw
    which: ties go to the earlier sample in the sampler's order, as in one process."""
    from pl_pmse.callback.selection import Sample, WorstSamples

    values = [0.5, 0.9, 0.5, 0.9, 0.9, 0.1, 0.5, 0.9, 0.3, 0.9, 0.5, 0.9]

    def sample(position: int) -> Sample:
        return Sample(values[position], -position, f"sample {position}", {}, torch.zeros(1), torch.zeros(1))

    def chosen(heaps: list[WorstSamples]) -> list[str]:  # what gathered() does with the heaps of every rank
        return [s.label for s in sorted((s for heap in heaps for s in heap.heap), reverse=True)[:4]]

    one = WorstSamples(4)
    for position in range(len(values)):
        if one.wants(values[position], position):
            one.add(sample(position))
    ranks = [WorstSamples(4) for _ in range(world)]
    for rank, heap in enumerate(ranks):
        for position in range(rank, len(values), world):  # DistributedSampler: rank r takes r, r + W, ...
            if heap.wants(values[position], position):
                heap.add(sample(position))
    assert chosen([one]) == chosen(ranks) == ["sample 1", "sample 3", "sample 4", "sample 7"]


def test_the_same_number_with_the_cpu_kernels_of_other_machines() -> None:
    """The README's "What is the same where", checked under every kernel path this CPU can be made to run: torch's
    AVX2 and scalar kernels (``ATEN_CPU_CAPABILITY``; the scalar ones are what ARM and old x86 CPUs are closest to)
    and MKL's code paths (``MKL_CBWR``: on an Intel CPU COMPATIBLE / AVX2 / AVX512 change the FFT's bits; on an AMD
    CPU MKL runs its generic path whatever is asked, so these runs equal the first there). Elementwise results keep
    their bits under the vectorised kernels and every MKL path; FFT results, and every float result under the scalar
    kernels, agree to ACROSS_CPUS_RTOL; integer inputs keep their bits everywhere. An FFT that rounds differently
    (float64, then rounded) is played in the process too, so the FFT claim is checked on any CPU."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from tests.distributed import clean_environment
    from tests.kernel_bits import ACROSS_CPUS_RTOL, EXACT_EVERYWHERE, FFT_RESULTS, Float64FFT, measurements

    def floats(found: list[int]) -> torch.Tensor:
        return torch.tensor(found, dtype=torch.int64).view(torch.float64)

    def check(there: dict[str, list[int]], scalar_kernels: bool, path: object) -> None:
        assert there.keys() == here.keys(), path
        for key in here:
            if key.startswith("torchaudio filter bank"):  # a count: a few entries one float32 rounding apart
                assert there[key][0] <= 0.01 * 257 * 80, (key, path)
            elif key in EXACT_EVERYWHERE or not (scalar_kernels or key in FFT_RESULTS):
                assert there[key] == here[key], (key, path)
            else:
                torch.testing.assert_close(floats(there[key]), floats(here[key]), rtol=ACROSS_CPUS_RTOL, atol=0,
                                           msg=lambda m, key=key: f"{key} under {path}: {m}")  # fmt: skip

    here = measurements()
    environment = {key: value for key, value in clean_environment().items() if not key.startswith(("MKL_", "ATEN_"))}
    script = Path(__file__).with_name("kernel_bits.py")
    paths = [{"MKL_CBWR": path} for path in ("COMPATIBLE", "AVX2", "AVX512")]
    paths += [{"ATEN_CPU_CAPABILITY": capability} for capability in ("avx2", "default")]
    for path in paths:
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                              env={**environment, **path}, check=True)  # fmt: skip
        there = json.loads(done.stdout)
        capability = there.pop("capability")
        assert capability in ("AVX2", "AVX512", "DEFAULT", "NO AVX"), path  # torch 2.4 calls the scalar kernels NO AVX
        check(there, capability in ("DEFAULT", "NO AVX"), path)
    with Float64FFT():
        there = measurements()
    changed = {key for key in here if there[key] != here[key]}
    assert {"mel", "mrstft", "image profile error", "audio profile error"} <= changed <= FFT_RESULTS
    check(there, False, "a float64 FFT")
    import torchaudio

    from pl_pmse.spaces.audio import mel_filter_bank

    ours = mel_filter_bank(513, 0.0, 8000.0, 80, 16000)
    torch.testing.assert_close(
        ours, torchaudio.functional.melscale_fbanks(513, 0.0, 8000.0, 80, 16000), rtol=0, atol=2e-6
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_inputs_that_are_already_inf_get_a_clear_error_and_change_nothing(dtype: torch.dtype) -> None:
    preds, target = (x.to(dtype) for x in _image_pair())
    preds[1, 0, 0, 0] = math.inf  # an fp16 model output that overflowed
    for space in ("pixel", "pyramid"):
        metric = PerceptionMSE(space, data_range=1.0)
        with pytest.raises(ValueError, match=r"preds: contains NaN or Inf in samples \[1\]"):
            metric.update(preds, target)
        assert metric.totals.abs().sum() == 0 and metric.update_count == 0
        unchecked = PerceptionMSE(space, data_range=1.0, validate_args=False)
        unchecked.update(preds, target)  # found on the device, reported at compute
        with pytest.raises(ValueError, match=r"1 sample\(s\) had NaN or Inf"):
            unchecked.compute()
        skipping = PerceptionMSE(space, data_range=1.0, nan_strategy="ignore")
        skipping.update(preds, target)
        reference = PerceptionMSE(space, data_range=1.0)
        reference.update(preds[:1], target[:1])
        assert torch.equal(skipping.compute(), reference.compute())


def test_the_band_filters_written_out_gradients_equal_autograds() -> None:
    """The mel filters back-propagate by adding each band's windows into their frequencies on a CPU (the same bits as
    autograd's gradient through the per-band gather, without its zero-filled tensor of every window) and by the dense
    product on an accelerator (reproducible there): both equal autograd's."""
    from pl_pmse.spaces.audio import MelFilterBank, _BandGradient

    filters = MelFilterBank(257, 0.0, 8000.0, 40, 16000).double()
    power = torch.rand(2, 257, 30, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(2, 40, 30, dtype=torch.float64)
    (expected,) = torch.autograd.grad((filters.per_band(power) * weights).sum(), power)
    (got,) = torch.autograd.grad((_BandGradient.apply(power, filters) * weights).sum(), power)
    assert torch.equal(got, expected)
    torch.testing.assert_close(torch.matmul(filters.fb, weights), expected, rtol=1e-12, atol=1e-14)
    assert torch.equal(_BandGradient.apply(power, filters), filters.per_band(power))
