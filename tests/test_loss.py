"""Perception MSE as a training loss: no graph for a constant target, no host synchronisation with
validate_args=False, torch.compile(fullgraph=True), and the pyramid at large sizes."""

from __future__ import annotations

import copy
import importlib.util
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchaudio
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

from pl_pmse import PerceptionMSE, perception_mse, perception_mse_components
from pl_pmse.spaces import get_space
from pl_pmse.spaces import image as image_spaces
from pl_pmse.spaces.audio import _power_spectrogram
from tests import torch_support

_COMMON = importlib.util.spec_from_file_location("benchmark_common", Path(__file__).parents[1] / "benchmarks/common.py")
benchmark_common = importlib.util.module_from_spec(_COMMON)
_COMMON.loader.exec_module(benchmark_common)
hand_written_loss, saved_bytes = benchmark_common.hand_written_loss, benchmark_common.saved_bytes  # one reference

LOSS_SPACES = ("pixel", "pyramid", "vgg16", "mel")


class HostSyncs(TorchFunctionMode):
    """Records the torch calls that make the host wait for the device (on a GPU): reading values back
    (``item``, ``bool``, ``tolist``...), data-dependent shapes (``nonzero``, boolean-mask indexing) and host data
    turned into device tensors (``torch.tensor``, list indices)."""

    WAITING = frozenset(("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "argwhere",
                         "numpy", "cpu", "masked_select", "unique", "tensor", "as_tensor"))  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in self.WAITING or (name in ("__getitem__", "__setitem__") and _host_index(args[1])):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def _host_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, list) or (isinstance(p, torch.Tensor) and p.dtype == torch.bool) for p in parts)


def loss_case(name: str, batch: int = 3) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.nn.Module]:
    """A space, an input, a target and a small model whose output stays in the space's range."""
    if name == "mel":
        space = get_space("mel", sample_rate=16000, n_fft=256, n_mels=40)
        x, target = torch.rand(batch, 4000) * 2 - 1, torch.rand(batch, 4000) * 2 - 1
        model = torch.nn.Sequential(torch.nn.Unflatten(1, (1, -1)), torch.nn.Conv1d(1, 1, 3, padding=1),
                                    torch.nn.Flatten(), torch.nn.Tanh())  # fmt: skip
        return space, x, target, model
    space = get_space(name, weights="random") if name == "vgg16" else get_space(name)
    x, target = torch.rand(batch, 3, 32, 32), torch.rand(batch, 3, 32, 32)
    return space, x, target, torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.Sigmoid())


@pytest.mark.parametrize("name", LOSS_SPACES)
def test_a_constant_target_builds_no_graph(name: str) -> None:
    space, x, target, model = loss_case(name)
    ours, loss = saved_bytes(lambda: perception_mse(model(x), target, space))
    baseline, expected = saved_bytes(lambda: hand_written_loss(space)(model(x), target))
    assert ours <= 1.1 * baseline, (ours, baseline)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    # the gradient equals the one through the shared forward (a target that requires grad takes that path)
    weight = next(model.parameters())
    (gradient,) = torch.autograd.grad(loss, weight)
    tracked = target.clone().requires_grad_()
    both = perception_mse(model(x), tracked, space)
    if name in ("vgg16", "mel"):  # the shared forward keeps the target's activations too: the test can tell
        assert saved_bytes(lambda: perception_mse(model(x), tracked, space))[0] > ours
    (reference,) = torch.autograd.grad(both, weight)
    torch.testing.assert_close(gradient, reference, rtol=1e-4, atol=1e-7)


def test_the_pyramid_measures_the_difference() -> None:
    """A linear space transforms preds - target once: the same numbers as two pyramids, half the work."""
    space = get_space("pyramid", levels=4)
    preds, target = torch.rand(2, 3, 40, 36, dtype=torch.float64), torch.rand(2, 3, 40, 36, dtype=torch.float64)
    parts = perception_mse_components(preds, target, space, reduction="none")
    for name, p, t in zip(space.component_names[1:], space.pyramid(preds), space.pyramid(target), strict=True):
        torch.testing.assert_close(parts[name], (p - t).square().flatten(1).mean(1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", LOSS_SPACES)
def test_validate_args_false_makes_no_host_synchronisation(name: str) -> None:
    space, x, target, model = loss_case(name)
    preds = model(x)
    checked = perception_mse(preds, target, space)
    with HostSyncs() as syncs:
        loss = perception_mse(preds, target, space, validate_args=False)
        loss.backward()
        perception_mse(preds.detach(), target, space, validate_args=False, nan_strategy="ignore", reduction="none")
    assert syncs.calls == []
    torch.testing.assert_close(loss, checked, rtol=1e-6, atol=0)
    with HostSyncs() as syncs:  # the detector sees the checks that validate_args=True makes
        perception_mse(preds, target, space)
    assert "item" in syncs.calls or "__bool__" in syncs.calls or "__float__" in syncs.calls

    options = {} if name == "mel" else {"data_range": (0.0, 1.0)}
    metric, reference = (PerceptionMSE(space, validate_args=v, **options) for v in (False, True))
    mask = torch.tensor([True, False, True])
    with torch.no_grad():
        for each in (metric, reference):
            each.update(preds, target)
            each.update(preds, target, mask=mask)
            each(preds, target)
    assert torch.equal(metric.totals, reference.totals)  # the same state, bit for bit

    # The metric's updates on an accelerator (a CPU reads its counts at no cost): under fake CUDA, where reading a
    # value back raises, with the detector on
    if torch_support.WHY_NOT:
        pytest.skip(torch_support.REASON)  # the CPU checks above have run
    on_device = PerceptionMSE(loss_case(name)[0], validate_args=False, **options)
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True), torch.device("cuda"):
        on_device = on_device.to("cuda")
        preds, target, mask = preds.to("cuda"), target.to("cuda"), mask.to("cuda")
        on_device.update(preds, target)  # the first update on a device makes its constants
        with HostSyncs() as syncs:
            on_device.update(preds, target)
            on_device.update(preds, target, mask=mask)
            on_device(preds, target)
    assert syncs.calls == []


def test_validate_args_false_keeps_the_state_clean_and_reports_at_compute() -> None:
    preds, target = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    poisoned = preds.clone()
    poisoned[1, 0, 0, 0] = float("nan")
    clean = [0, 2, 3]

    metric = PerceptionMSE(validate_args=False).set_dtype(torch.float64)
    metric.update(poisoned, target)  # no error here: finding the NaN on the host would wait for the device
    state = metric.totals.clone()
    with pytest.raises(ValueError, match=r"1 sample\(s\) had NaN or Inf .*\(validate_args=False"):
        metric.compute()
    assert torch.equal(metric.totals, state)  # nothing of the bad sample entered, nothing changed by the error
    with pytest.raises(ValueError, match="NaN or Inf"):
        metric.compute()  # not cached

    for strategy in ("ignore", "warn"):
        unchecked = PerceptionMSE(nan_strategy=strategy, validate_args=False).set_dtype(torch.float64)
        checked = PerceptionMSE(nan_strategy=strategy).set_dtype(torch.float64)
        unchecked.update(poisoned, target)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            checked.update(poisoned, target)
        assert torch.equal(unchecked.totals, checked.totals)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = unchecked.compute_summary()
        assert summary["skipped"] == 1
        assert len([w for w in caught if "1 sample(s) had NaN" in str(w.message)]) == (strategy == "warn")
        expected = perception_mse(preds[clean], target[clean]).double()
        torch.testing.assert_close(summary["total"], expected, rtol=1e-6, atol=0)

    # the functional: "error" lets the NaN through (a NaN loss), "ignore" skips on the device with clean gradients
    assert perception_mse(poisoned, target, validate_args=False).isnan()
    leaf = poisoned.clone().requires_grad_()
    loss = perception_mse(leaf, target, "pyramid", nan_strategy="ignore", validate_args=False)
    loss.backward()
    assert torch.isfinite(leaf.grad).all() and (leaf.grad[1] == 0).all()
    torch.testing.assert_close(loss, perception_mse(preds[clean], target[clean], "pyramid"), rtol=1e-6, atol=0)


def test_validate_args_false_still_checks_types_shapes_and_devices() -> None:
    metric = PerceptionMSE("pyramid", validate_args=False)
    cases = [
        ((torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 31)), "expected the same shape"),
        ((torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32) > 0.5), "expected a real floating point or integer"),
        ((torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)), "at least 17"),
        ((torch.rand(2, 3, 32), torch.rand(2, 3, 32)), r"expects images \[N, C, H, W\]"),
        (([1.0], torch.rand(1)), "expected a torch.Tensor"),
    ]
    for (preds, target), message in cases:
        for call in (metric.update, lambda p, t: perception_mse(p, t, "pyramid", validate_args=False)):
            with pytest.raises((TypeError, ValueError), match=message):
                call(preds, target)
    with pytest.raises(TypeError, match="mask: expected a bool tensor"):
        metric.update(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32), mask=torch.ones(2))
    assert metric.update_count == 0 and not metric.totals.any()
    # what is NOT checked: the value range (0..255 data in a [0, 1] space is measured as given)
    with pytest.raises(ValueError, match="expects values in"):
        perception_mse(torch.rand(1, 3, 32, 32) * 255, torch.rand(1, 3, 32, 32) * 255, "pyramid")
    perception_mse(torch.rand(1, 3, 32, 32) * 255, torch.rand(1, 3, 32, 32) * 255, "pyramid", validate_args=False)


def test_validate_args_false_metric_forward_keeps_gradients_clean_and_refuses_per_step_sync() -> None:
    preds, target = torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32)
    preds[1, 0, 0, 0] = float("nan")
    leaf = preds.clone().requires_grad_()
    metric = PerceptionMSE("pyramid", validate_args=False)
    value = metric(leaf, target)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(leaf.grad).all() and (leaf.grad[1] == 0).all()
    with pytest.raises(ValueError, match="NaN or Inf"):
        metric.compute()
    checked = PerceptionMSE("pyramid")
    checked.update(preds[[0, 2]], target[[0, 2]])
    checked.merge_state(metric)  # the same configuration: validate_args decides where errors show, not the state
    with pytest.raises(ValueError, match="dist_sync_on_step=True syncs every step"):
        PerceptionMSE(validate_args=False, dist_sync_on_step=True)


@torch_support.needs_fullgraph_compile
@pytest.mark.parametrize("name", LOSS_SPACES)
def test_compile_fullgraph_equals_eager(name: str) -> None:
    """The whole loss in one graph (no break) through autograd (aot_eager: Dynamo + AOTAutograd, the compiler's
    front half); test_compiled_by_inductor runs the code generator too."""
    space, x, target, model = loss_case(name, batch=2)
    preds = model(x).detach().requires_grad_()
    loss = torch.compile(lambda p, t: perception_mse(p, t, space, validate_args=False), fullgraph=True,
                         backend="aot_eager")(preds, target)  # fmt: skip
    (gradient,) = torch.autograd.grad(loss, preds)
    eager = perception_mse(preds, target, space, validate_args=False)
    (expected,) = torch.autograd.grad(eager, preds)
    torch.testing.assert_close(loss, eager, rtol=1e-6, atol=0)
    torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=1e-9)


@torch_support.needs_fullgraph_compile
def test_compiled_by_inductor() -> None:
    """The default compiler (Inductor's generated C++ on CPU) gives eager's values to float32 rounding."""
    space, x, target, model = loss_case("mel", batch=2)
    preds = model(x).detach().requires_grad_()
    compiled = torch.compile(lambda p, t: perception_mse(p, t, space, validate_args=False), fullgraph=True)
    loss = compiled(preds, target)
    (gradient,) = torch.autograd.grad(loss, preds)
    eager = perception_mse(preds, target, space)
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=0)
    torch.testing.assert_close(gradient, torch.autograd.grad(eager, preds)[0], rtol=1e-4, atol=1e-8)


def reference_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """The plain whole-image pyramid (F.pad reflect, shifted views), as 0.1 computed it."""
    taps = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)

    def blur(x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (2, 2, 2, 2), mode="reflect")
        rows = sum(t * x[..., i : x.shape[-1] - 4 + i] for i, t in enumerate(taps))
        return sum(t * rows[..., i : rows.shape[-2] - 4 + i, :] for i, t in enumerate(taps))

    bands = []
    for _ in range(levels - 1):
        smaller = blur(x)[..., ::2, ::2]
        up = x.new_zeros(x.shape)
        up[..., ::2, ::2] = smaller
        bands.append(x - 4 * blur(up))
        x = smaller
    return [*bands, x]


@pytest.mark.parametrize("grad", [False, True])
def test_pyramid_equals_the_plain_formulation_bit_for_bit(grad: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks (tiny ones here: many blocks, halos and mirrored borders on every side), odd and even sizes, every
    level count: the same bits as the whole-image formulation, with and without autograd."""
    monkeypatch.setattr(image_spaces, "BLOCK_ELEMENTS", 100)
    for height, width in ((17, 17), (18, 19), (20, 18), (33, 40)):
        x = torch.rand(2, 3, height, width, requires_grad=grad)
        for levels in range(2, 6):
            if min(height, width) < 2 ** (levels - 1) + 1:
                continue
            ours = get_space("pyramid", levels=levels).pyramid(x)
            expected = reference_pyramid(x, levels)
            assert all(torch.equal(a, b) for a, b in zip(ours, expected, strict=True)), (height, width, levels)
            if grad:
                weights = [torch.rand_like(b) for b in expected]
                mine = torch.autograd.grad(sum((a * w).sum() for a, w in zip(ours, weights, strict=True)), x)[0]
                theirs = torch.autograd.grad(sum((b * w).sum() for b, w in zip(expected, weights, strict=True)), x)[0]
                torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_spectrograms_equal_torchaudio_bit_for_bit() -> None:
    """The spectrograms come from torch.stft directly (traceable): torchaudio's transforms give the same bits; the mel
    filters are applied per band (the same bits on every CPU), equal to torchaudio's matrix product to rounding."""
    x = torch.rand(3, 2, 5000) * 2 - 1
    mel = get_space("mel", sample_rate=16000, n_fft=512, hop_length=100)
    analysis = mel.analysis
    power = _power_spectrogram(analysis.spectrogram, x)
    assert torch.equal(power, analysis.spectrogram(x))
    dense = torch.matmul(power.transpose(-1, -2), analysis.filters.fb).transpose(-1, -2)  # torchaudio's MelScale
    torch.testing.assert_close(analysis(x), dense, rtol=2e-6, atol=0)
    reference = torchaudio.transforms.MelSpectrogram(16000, n_fft=512, hop_length=100, power=2.0, n_mels=80)
    torch.testing.assert_close(mel.features(x)["mel"], torch.log(reference(x) + mel.eps), rtol=0, atol=1e-5)
    mrstft = get_space("mrstft", fft_sizes=(256, 1024))
    for (name, value), spectrogram in zip(mrstft.features(x).items(), mrstft.spectrograms, strict=True):
        assert torch.equal(value, 0.5 * torch.log(spectrogram(x) + mrstft.eps)), name


def test_pyramid_blocks_change_no_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pyramid is worked in blocks of planes and rows; any block size gives the same bits, and a sample's bands
    do not depend on the rest of the batch."""
    space = get_space("pyramid", levels=4, luma_chroma=True)
    images = torch.rand(3, 3, 75, 41)
    whole = space.features(images)
    for block in (64, 1000, 5000):
        monkeypatch.setattr(image_spaces, "BLOCK_ELEMENTS", block)
        assert all(torch.equal(whole[k], v) for k, v in space.features(images).items())
        single = space.features(images[1:2])
        assert all(torch.equal(whole[k][1:2], v) for k, v in single.items())


def test_backbone_hooks_survive_copies_and_leave_the_network_alone() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3), torch.nn.ReLU())
    space = get_space(net, layers={"low": "1", "high": "3"}, normalize="none")
    other = get_space(net, layers={"high": "3"}, normalize="none")  # a second space on the same network
    x = torch.rand(2, 3, 16, 16)
    expected = space.features(x)
    assert net(x).shape == (2, 4, 12, 12)  # called directly, the network runs as before (the hooks stay quiet)
    assert list(other.features(x)) == ["high"]
    for copied in (copy.deepcopy(space), pickle.loads(pickle.dumps(space)), copy.copy(space)):
        features = copied.features(x)
        assert all(torch.equal(expected[k], v) for k, v in features.items())
    # one hook per layer module however many spaces (or functional calls on a raw module) read it
    for _ in range(3):
        perception_mse(x, x.flip(0), net, layers={"low": "1", "high": "3"}, normalize="none")
    assert len(net[1]._forward_hooks) == len(net[3]._forward_hooks) == 1 and not net[0]._forward_hooks


def test_lpips_sides_are_normalised_alike() -> None:
    """The side with a graph and the side without one go through the same operations: x against itself is 0."""
    space = get_space("lpips-alex", weights="random")
    x = torch.rand(2, 3, 48, 48, requires_grad=True)
    assert perception_mse(x, x.detach(), space, data_range=1.0) == 0
