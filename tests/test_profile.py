"""ErrorProfile against numpy references: the pooled error map, radial spectra and mel-band profile."""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import pytest
import torch
import torchaudio
from torch import Tensor

from pl_pmse import ErrorProfile
from pl_pmse.exact import NUM_BINS, exact_sums
from pl_pmse.profile import radial_power
from pl_pmse.profile.base import new_tensor as _new


def exact_bands(height: int, width: int, bands: int) -> np.ndarray:
    """``[H, W // 2 + 1]``: the band of each frequency, ``floor(radius / sqrt(0.5) * bands)``, in rational arithmetic
    (a float formula puts frequencies on a band edge on either side depending on the CPU's rounding)."""
    rows = []
    for ky in range(height):
        fy = ky if ky < (height + 1) // 2 else ky - height  # numpy's fftfreq order
        row = []
        for kx in range(width // 2 + 1):
            q = 2 * bands**2 * (Fraction(fy * fy, height * height) + Fraction(kx * kx, width * width))
            row.append(min(math.isqrt(math.floor(q)), bands - 1))  # floor(sqrt(q)) == isqrt(floor(q))
        rows.append(row)
    return np.array(rows)


def radial_reference(images: np.ndarray, bands: int) -> np.ndarray:
    """Mean |FFT|^2 / (H W) of the channel mean per radial band, over the half spectrum numpy's rfft2 keeps."""
    planes = images.mean(1)
    height, width = planes.shape[1:]
    power = np.abs(np.fft.fft2(planes)[:, :, : width // 2 + 1]) ** 2 / (height * width)
    band = exact_bands(height, width, bands)
    return np.stack([power[:, band == b].mean(1) if (band == b).any() else np.zeros(len(planes))
                     for b in range(bands)], 1).mean(0)  # fmt: skip


def test_image_profile_equals_numpy_and_does_not_depend_on_the_batch_split() -> None:
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(10, 3, 48, 40, generator=generator)
    preds = (target + 0.1 * torch.randn(target.shape, generator=generator)).clamp(0, 1)
    whole = ErrorProfile("image", 1.0, grid=8, bands=12)
    whole.update(preds, target)
    result = whole.compute()
    near_perfect = preds.clone()
    near_perfect[4] = target[4] + 1e-7 * torch.randn(target[4].shape, generator=generator)  # 1e-14 vs 1e-2 errors
    splits = [[slice(0, 10)], [slice(0, 3), slice(3, 4), slice(4, 10)], [slice(i, i + 1) for i in range(10)]]
    for inputs in ((preds, target), (near_perfect, target), (preds.to(memory_format=torch.channels_last), target)):
        assert_same_profile(inputs, splits, lambda: ErrorProfile("image", 1.0, grid=8, bands=12))

    p, t = preds.double().numpy(), target.double().numpy()
    blocks = ((p - t) ** 2).mean(1).reshape(10, 8, 6, 8, 5).mean((2, 4))  # 48x40 pooled to 8x8
    np.testing.assert_allclose(result["error_map"].numpy(), blocks.mean(0), rtol=1e-5)
    for name, images in (("error", p - t), ("target", t), ("preds", p)):
        np.testing.assert_allclose(result[name].numpy(), radial_reference(images, 12), rtol=1e-4, atol=1e-9)
    assert result["frequency"][0] == pytest.approx(0.5 / 12 * math.sqrt(0.5))


def test_audio_profile_equals_torchaudio_per_mel_band() -> None:
    generator = torch.Generator().manual_seed(1)
    target = torch.randn(3, 4000, generator=generator) * 0.3
    preds = target + 0.05 * torch.randn(3, 4000, generator=generator)
    profile = ErrorProfile("audio", sample_rate=8000, n_fft=256, n_mels=16)
    profile.update(preds, target)
    result = profile.compute()
    mel = torchaudio.transforms.MelSpectrogram(8000, n_fft=256, hop_length=64, n_mels=16, power=2.0).double()
    target_mel, preds_mel = mel(target.double()).numpy(), mel(preds.double()).numpy()  # [N, bands, frames]
    log_error = (np.log(preds_mel + 1e-5) - np.log(target_mel + 1e-5)) ** 2
    for name, values in (("error", log_error), ("target", target_mel), ("preds", preds_mel)):
        np.testing.assert_allclose(result[name].numpy(), values.mean((0, 2)), rtol=1e-4)
    assert torch.all(result["frequency"].diff() > 0) and result["frequency"][-1] < 4000


def test_error_profile_skips_empty_batches() -> None:
    for profile, empty in ((ErrorProfile("image"), torch.zeros(0, 3, 32, 32)),
                           (ErrorProfile("audio", sample_rate=8000), torch.zeros(0, 4000))):  # fmt: skip
        profile.update(empty, empty)
        assert profile.totals.abs().sum() == 0 and list(profile.state_dict()) == []


def test_audio_profile_does_not_depend_on_the_batch_split() -> None:
    generator = torch.Generator().manual_seed(2)
    target = torch.randn(9, 2, 3000, generator=generator)
    preds = target + 0.1 * torch.randn(target.shape, generator=generator)
    splits = [[slice(0, 9)], [slice(0, 1), slice(1, 5), slice(5, 9)]]
    assert_same_profile((preds, target), splits, lambda: ErrorProfile("audio", sample_rate=8000, n_fft=256, n_mels=20))


def assert_same_profile(
    inputs: tuple[Tensor, Tensor], splits: list[list[slice]], profile: Callable[[], ErrorProfile]
) -> None:
    """Every split of the batch gives the same exact sums and counts, so the same bits of every result."""
    states, results = [], []
    for rows in splits:
        metric = profile()
        for part in rows:
            metric.update(inputs[0][part], inputs[1][part])
        states.append((exact_sums(metric.totals[:-1].view(-1, NUM_BINS)), int(metric.totals[-1])))
        results.append(metric.compute())
    assert all(state == states[0] for state in states)  # the digits may differ, the sums they hold may not
    for result in results[1:]:
        assert all(torch.equal(result[key], results[0][key]) for key in result)


def test_radial_power_of_tiny_images_has_empty_bands_at_zero() -> None:
    images = torch.rand(4, 3, 5, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    np.testing.assert_allclose(radial_power(images, 8).mean(0).numpy(), radial_reference(images.numpy(), 8), rtol=1e-12)


def test_image_profile_reuses_its_temporaries_safely() -> None:
    generator = torch.Generator().manual_seed(5)
    batches = [torch.rand(n, 3, 24, 20, generator=generator) for n in (6, 6, 2, 6)]  # a smaller last batch
    reused, fresh = ErrorProfile("image", 1.0, grid=4, bands=6), ErrorProfile("image", 1.0, grid=4, bands=6)
    fresh._scratch = _new  # new temporaries every time, as on an accelerator
    for index, target in enumerate(batches):
        preds = (target + 0.1 * torch.randn(target.shape, generator=generator)).clamp(0, 1)
        with torch.inference_mode(index % 2 == 0):  # Lightning validates in inference mode, users may not
            for profile in (reused, fresh):
                profile.update(preds, target)
        if index == 0:
            planes = reused.__dict__["_buffers_of_update"]["planes"]
        if index == 1:
            assert reused.__dict__["_buffers_of_update"]["planes"] is planes  # the same memory, batch after batch
            reused = pickle.loads(pickle.dumps(reused))  # temporaries are not pickled
            assert "_buffers_of_update" not in reused.__dict__
    expected, got = fresh.compute(), reused.compute()
    assert all(torch.equal(got[key], expected[key]) for key in expected)


EDGE_SIZES = [(64, 64, 16), (48, 40, 12), (33, 17, 7), (31, 64, 9), (5, 3, 8)]


@pytest.mark.parametrize(("height", "width", "bands"), EDGE_SIZES)
def test_radial_bands_are_assigned_exactly_on_band_edges(height: int, width: int, bands: int) -> None:
    from pl_pmse.profile import radial_band_of_frequencies

    expected = exact_bands(height, width, bands)
    np.testing.assert_array_equal(radial_band_of_frequencies(height, width, bands).view(height, -1).numpy(), expected)
    images = torch.rand(3, 3, height, width, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    np.testing.assert_allclose(radial_power(images, bands).mean(0).numpy(), radial_reference(images.numpy(), bands),
                               rtol=1e-12, atol=1e-15)  # fmt: skip
    on_edges = [  # frequencies exactly on a band edge (radius == b * sqrt(0.5) / bands): a float formula errs there
        (ky, kx)
        for ky in range(-(height // 2), (height + 1) // 2)
        for kx in range(width // 2 + 1)
        if (q := 2 * bands**2 * (Fraction(ky * ky, height**2) + Fraction(kx * kx, width**2))).denominator == 1
        and 0 < math.isqrt(q.numerator) ** 2 == q.numerator
        and math.isqrt(q.numerator) < bands
    ]
    if (height, width) in ((64, 64), (48, 40)):
        assert on_edges  # the sizes of the issue: the test covers edge frequencies


def test_radial_band_layout_refuses_sizes_beyond_its_integer_range() -> None:
    from pl_pmse.profile import radial_band_of_frequencies

    with pytest.raises(ValueError, match="bands: 64 radial bands of 65535x65536 images"):
        radial_band_of_frequencies(65535, 65536, 64)
