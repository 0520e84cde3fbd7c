"""ImageFidelity: SSIM against torchmetrics, sharpness on real photographs, exactness and bad input."""

from __future__ import annotations

import warnings

import pytest
import torch
from skimage import data as photographs
from torchmetrics.image import StructuralSimilarityIndexMeasure

from pl_pmse.fidelity import ImageFidelity, high_frequency_power
from tests.torch_support import needs_fake_cuda


def pairs(shape: tuple[int, ...], seed: int = 0, noise: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    target = torch.rand(shape, generator=generator)
    return target + noise * torch.randn(shape, generator=generator), target


@pytest.mark.parametrize(
    ("shape", "data_range"),
    [((4, 3, 32, 32), 1.0), ((3, 1, 17, 23), 1.0), ((2, 3, 64, 48), (0.0, 1.0)), ((5, 3, 6, 6), 2.0),
     ((2, 3, 40, 40), (0.2, 0.9))],
)  # fmt: skip
def test_ssim_equals_torchmetrics(shape: tuple[int, ...], data_range) -> None:
    preds, target = pairs(shape)
    reference = StructuralSimilarityIndexMeasure(data_range=data_range)
    ours = ImageFidelity(data_range, sharpness=min(shape[-2:]) >= 8)
    for half in (slice(0, shape[0] // 2), slice(shape[0] // 2, None)):
        reference.update(preds[half], target[half])
        ours.update(preds[half], target[half])
    assert ours.compute()["ssim"].item() == pytest.approx(reference.compute().item(), abs=3e-7)


def test_integer_images_are_measured_as_their_float_values() -> None:
    target = torch.randint(0, 256, (3, 3, 24, 24), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    preds = (target.int() + torch.randint(-20, 20, target.shape)).clamp(0, 255).to(torch.uint8)
    integers, floats = ImageFidelity(255), ImageFidelity(255.0)
    integers.update(preds, target)
    floats.update(preds.float(), target.float())
    assert torch.equal(integers.compute()["ssim"], floats.compute()["ssim"])
    assert torch.equal(integers.compute()["sharpness"], floats.compute()["sharpness"])


def test_the_same_bits_for_any_batch_split_and_order() -> None:
    preds, target = pairs((12, 3, 33, 29), seed=2)
    whole = ImageFidelity().set_dtype(torch.float64)
    whole.update(preds, target)
    split = ImageFidelity().set_dtype(torch.float64)
    for rows in (slice(7, 12), slice(0, 1), slice(1, 7)):
        split.update(preds[rows], target[rows])
    assert whole.compute() == split.compute() and whole.compute()["ssim"].dtype == torch.float64
    default = ImageFidelity()
    default.update(preds, target)
    assert default.compute()["ssim"].dtype == torch.float32


def photograph_batch() -> torch.Tensor:
    """Crops of scikit-image's shipped photographs (RGB in [0, 1])."""
    crops = []
    for image in (photographs.astronaut(), photographs.coffee(), photographs.chelsea(), photographs.rocket()):
        x = torch.from_numpy(image[:256, :256].copy()).permute(2, 0, 1).float() / 255
        crops.append(x)
    return torch.stack(crops)


def test_sharpness_tells_blur_from_noise_on_photographs() -> None:
    target = photograph_batch()
    box = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(target, (1, 1, 1, 1), mode="reflect"), 3, stride=1)
    noisy = (target + 0.1 * torch.randn(target.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    values = {}
    for name, preds in (("same", target), ("blur", box), ("noise", noisy)):
        fidelity = ImageFidelity()
        fidelity.update(preds, target)
        values[name] = fidelity.compute()
    assert values["same"]["sharpness"] == 1 and values["same"]["ssim"] == pytest.approx(1)
    assert values["blur"]["sharpness"] < 0.3  # a 3x3 box keeps little above 0.25 cycles/pixel
    assert values["noise"]["sharpness"] > 2.5  # photographs have little power there; white noise most of its own
    assert values["blur"]["ssim"] < 1 and values["noise"]["ssim"] < 1


def test_high_frequency_power_counts_every_frequency_once() -> None:
    x = torch.randn(3, 2, 16, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    planes = x.mean(1)
    spectrum = torch.fft.fft2(planes, norm="ortho").abs().square()
    fy, fx = torch.meshgrid(torch.fft.fftfreq(16, dtype=torch.float64), torch.fft.fftfreq(10, dtype=torch.float64),
                            indexing="ij")  # fmt: skip
    expected = (spectrum * ((fy**2 + fx**2).sqrt() >= 0.25)).sum((1, 2))
    assert torch.allclose(high_frequency_power(x), expected, rtol=1e-12)
    # Parseval: a cutoff at the origin's neighbour would count all but the mean; the full power is the plane's
    assert torch.allclose(high_frequency_power(x, 1e-9) + spectrum[:, 0, 0], planes.square().sum((1, 2)))


@pytest.mark.parametrize("nan_strategy", ["ignore", "warn"])
def test_images_with_nan_and_masked_images_are_left_out_and_counted(nan_strategy: str) -> None:
    preds, target = pairs((4, 3, 16, 16), seed=4)
    reference = ImageFidelity()
    reference.update(preds[[0, 2]], target[[0, 2]])
    poisoned = preds.clone()
    poisoned[1, 0, 3, 3] = float("nan")
    fidelity = ImageFidelity(nan_strategy=nan_strategy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fidelity.update(poisoned, target, mask=torch.tensor([True, True, True, False]))
    assert fidelity.compute() == reference.compute()
    assert fidelity.compute_skipped() == 1 and reference.compute_skipped() == 0  # counted, not silent
    warned = [str(w.message) for w in caught if "contains NaN or Inf in samples [1]" in str(w.message)]
    assert len(warned) == (nan_strategy == "warn")


def test_figures_of_samples_with_nan_are_refused_by_default_naming_them() -> None:
    """PerceptionMSE's default and meaning: NaN in image 0 of 2 gave an SSIM over 1 image without a word."""
    from pl_pmse import MelCepstralDistortion

    preds, target = pairs((2, 3, 16, 16))
    preds[0, 1, 2, 2] = float("nan")
    clips = torch.rand(2, 4000) - 0.5
    noisy = clips.clone()
    noisy[1, 100] = float("inf")
    for metric, pair, bad in ((ImageFidelity(), (preds, target), 0), (MelCepstralDistortion(16000), (noisy, clips), 1)):
        with pytest.raises(ValueError, match=rf"preds: contains NaN or Inf in samples \[{bad}\]; clean the inputs"):
            metric.update(*pair)
        assert metric.update_count == 0 and not metric.totals.any()


@pytest.mark.parametrize(
    ("build", "update", "message"),
    [
        (dict(), ((2, 3, 5, 5),), r"ssim: needs images of at least 6x6 pixels, got \(5, 5\) \(turn it off with ssim"),
        (dict(ssim=False), ((2, 3, 7, 9),), r"sharpness: needs images of at least 8x8 pixels"),
        (dict(), ((2, 3, 16),), r"expects images \[N, C, H, W\], got shape \(2, 3, 16\)"),
    ],
)
def test_bad_input_names_the_option_and_leaves_the_state(build, update, message) -> None:
    fidelity = ImageFidelity(**build)
    good = pairs((2, 3, 16, 16))
    fidelity.update(*good)
    before = fidelity.totals.clone()
    with pytest.raises(ValueError, match=message):
        fidelity.update(*pairs(*update))
    assert torch.equal(fidelity.totals, before) and fidelity._update_count == 1


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        (dict(data_range=None), ValueError, r"data_range: SSIM needs the images' range"),
        (dict(ssim=False, sharpness=False), ValueError, "at least one of them"),
        (dict(cutoff=0.6), ValueError, r"cutoff: expected cycles per pixel in \(0, 0.5\], got 0.6"),
        (dict(ssim="yes"), TypeError, "ssim: expected True or False"),
        (dict(window=7), ValueError, "window: not an option of ImageFidelity"),
    ],
)
def test_bad_options_are_refused_by_name(options, error, message) -> None:
    with pytest.raises(error, match=message):
        ImageFidelity(**options)
    assert ImageFidelity(data_range=None, ssim=False).figures == ("sharpness",)


@needs_fake_cuda
def test_sample_values_read_no_tensor_back_on_an_accelerator() -> None:
    """Under fake CUDA (FakeTensorMode) any host read of a tensor raises: the window taps and the band weights are
    built on the host (before: both were read back from the default device)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fidelity = ImageFidelity()
    with FakeTensorMode(allow_non_fake_inputs=True), torch.device("cuda"):
        values = fidelity.sample_values(torch.rand(4, 3, 40, 36), torch.rand(4, 3, 40, 36))
    assert {name: tuple(value.shape) for name, value in values.items()} == {
        "ssim": (4,),
        "preds_power": (4,),
        "target_power": (4,),
    }


@pytest.mark.parametrize("span", [1e160, 1e-160, 1e20])
def test_every_data_range_perception_mse_takes_gives_finite_ssim_and_sharpness(span: float) -> None:
    """SSIM and sharpness do not change when the data and the range are scaled together: at 1e160 SSIM's constant
    (0.01 * span) ** 2 overflowed (OverflowError, a fit ended), at 1e-160 it vanished; float32 data at 1e20 overflowed
    in the squares. Each equals the value at range 1."""
    preds, target = (x.double() for x in pairs((3, 3, 32, 32)))
    reference = ImageFidelity(data_range=1.0)
    reference.update(preds, target)
    scaled = ImageFidelity(data_range=span)
    data = (preds * span, target * span) if span != 1e20 else ((preds * span).float(), (target * span).float())
    scaled.update(*data)
    for name, value in scaled.compute().items():
        assert torch.isfinite(value), name
        rtol = 1e-5 if span == 1e20 else 1e-12
        torch.testing.assert_close(value, reference.compute()[name], rtol=rtol, atol=0)


def test_sharpness_of_constant_targets_is_nan_with_a_word() -> None:
    fidelity = ImageFidelity()
    flat = torch.full((2, 3, 16, 16), 0.5)
    fidelity.update(flat + 0.1 * torch.rand(flat.shape), flat)
    with pytest.warns(UserWarning, match=r"sharpness is undefined \(NaN\): the 2 target image\(s\) have no power"):
        values = fidelity.compute()
    assert values["sharpness"].isnan() and values["ssim"].isfinite()
