"""Audio spaces against torch.stft and torchaudio's mel filter bank, computed independently here."""

from __future__ import annotations

import math

import pytest
import torch
import torchaudio

from pl_pmse import PerceptionMSE, get_space, perception_mse, perception_mse_components
from pl_pmse.spaces import MelSpace, MultiResolutionSTFT


def tones(n: int, length: int, sample_rate: int = 16000, seed: int = 0) -> torch.Tensor:
    """Harmonic tones with random pitch plus a little noise, in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(length) / sample_rate
    pitch = 100 + 400 * torch.rand(n, 1, generator=generator)
    signal = sum(torch.sin(2 * math.pi * k * pitch * t) / k for k in range(1, 4))
    return 0.4 * signal + 0.05 * torch.randn(n, length, generator=generator)


def log_power(x: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    window = torch.hann_window(n_fft, dtype=x.dtype)
    spec = torch.stft(x, n_fft, hop, window=window, center=True, pad_mode="reflect", return_complex=True)
    return spec.abs().square()


def test_mel_equals_stft_and_torchaudio_filter_bank() -> None:
    preds, target = tones(3, 12000), tones(3, 12000, seed=1)
    fbank = torchaudio.functional.melscale_fbanks(513, 0.0, 8000.0, 80, 16000, norm=None, mel_scale="htk")
    mel = lambda x: torch.log(torch.matmul(log_power(x, 1024, 256).transpose(-1, -2), fbank) + 1e-5)  # noqa: E731
    expected = (mel(preds) - mel(target)).square().flatten(1).mean(1)
    ours = perception_mse_components(preds, target, space="mel", sample_rate=16000, reduction="none")
    torch.testing.assert_close(ours["mel"], expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours["waveform"], (preds - target).square().mean(1))
    # the waveform is reported but weighs 0 by default
    torch.testing.assert_close(perception_mse(preds, target, space="mel", sample_rate=16000, reduction="none"),
                               ours["mel"])  # fmt: skip


def test_mrstft_equals_stft_log_magnitudes() -> None:
    preds, target = tones(2, 8000), tones(2, 8000, seed=1)
    ours = perception_mse_components(preds, target, space="mrstft", reduction="none")
    assert list(ours) == ["waveform", "stft512", "stft1024", "stft2048"]
    for n_fft in (512, 1024, 2048):
        log_mag = lambda x, n=n_fft: 0.5 * torch.log(log_power(x, n, n // 4) + 1e-5)  # noqa: E731
        expected = (log_mag(preds) - log_mag(target)).square().flatten(1).mean(1)
        torch.testing.assert_close(ours[f"stft{n_fft}"], expected, rtol=1e-5, atol=1e-7)
    total = perception_mse(preds, target, space="mrstft", reduction="none")
    torch.testing.assert_close(total, ours["stft512"] + ours["stft1024"] + ours["stft2048"])


@pytest.mark.parametrize(("space", "options"), [("mel", {"sample_rate": 22050}), ("mrstft", {}), ("waveform", {})])
def test_multichannel_is_the_mean_over_channels(space: str, options: dict) -> None:
    stereo_p = torch.stack([tones(3, 6000), tones(3, 6000, seed=2)], 1)
    stereo_t = torch.stack([tones(3, 6000, seed=3), tones(3, 6000, seed=4)], 1)
    stereo = perception_mse(stereo_p, stereo_t, space=space, reduction="none", **options)
    per_channel = [perception_mse(stereo_p[:, c], stereo_t[:, c], space=space, reduction="none", **options)
                   for c in range(2)]  # fmt: skip
    torch.testing.assert_close(stereo, (per_channel[0] + per_channel[1]) / 2, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(("space", "options"), [("mel", {"sample_rate": 16000}), ("mrstft", {})])
def test_per_sample_values_do_not_depend_on_the_batch(space: str, options: dict) -> None:
    preds, target = tones(5, 5000), tones(5, 5000, seed=1)
    whole = perception_mse(preds, target, space=space, reduction="none", **options)
    singles = torch.cat([perception_mse(preds[i : i + 1], target[i : i + 1], space=space, reduction="none", **options)
                         for i in range(5)])  # fmt: skip
    assert torch.equal(whole, singles)


def test_gradcheck_and_gradients() -> None:
    mel = MelSpace(sample_rate=8000, n_fft=64, n_mels=8).set_dtype(torch.float64)
    stft = MultiResolutionSTFT(fft_sizes=(32, 64)).set_dtype(torch.float64)
    target = torch.rand(2, 200, dtype=torch.float64) - 0.5
    preds = (torch.rand(2, 200, dtype=torch.float64) - 0.5).requires_grad_()
    for space in (mel, stft):
        assert torch.autograd.gradcheck(lambda p, s=space: perception_mse(p, target, space=s, reduction="none"),
                                        (preds,), atol=1e-5)  # fmt: skip
    preds32 = tones(2, 4000).requires_grad_()
    perception_mse(preds32, tones(2, 4000, seed=1), space="mrstft").backward()
    assert torch.isfinite(preds32.grad).all() and preds32.grad.abs().sum() > 0


def test_int16_audio_with_data_range() -> None:
    preds, target = tones(2, 4000), tones(2, 4000, seed=1)
    as_int = lambda x: (x * 32767).round().to(torch.int16)  # noqa: E731
    ints = perception_mse_components(as_int(preds), as_int(target), space="mel", sample_rate=16000,
                                     data_range=(-32768, 32767), reduction="none")  # fmt: skip
    floats = perception_mse_components((as_int(preds).double() + 32768) / 65535 * 2 - 1,
                                       (as_int(target).double() + 32768) / 65535 * 2 - 1,
                                       space="mel", sample_rate=16000, reduction="none")  # fmt: skip
    torch.testing.assert_close(ints["mel"], floats["mel"].float(), rtol=1e-4, atol=1e-6)


def test_metric_with_audio_spaces_accumulates_per_component() -> None:
    metric = PerceptionMSE("mrstft", component_weights={"stft512": 2.0, "waveform": 0.5})
    batches = [(tones(2, 4000, seed=s), tones(2, 4000, seed=s + 10)) for s in range(3)]
    for preds, target in batches:
        metric.update(preds, target)
    parts = metric.compute_components()
    preds, target = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    reference = perception_mse_components(preds, target, space="mrstft")
    for name, value in parts.items():
        torch.testing.assert_close(value.float(), reference[name], rtol=1e-5, atol=0)
    expected = 0.5 * parts["waveform"] + 2 * parts["stft512"] + parts["stft1024"] + parts["stft2048"]
    torch.testing.assert_close(metric.compute(), expected)


@pytest.mark.parametrize(
    ("space", "options", "shape", "pattern"),
    [
        ("mel", {}, (2, 4000), r"sample_rate: space 'mel' needs the audio's sample rate in Hz"),
        ("mel", {"sample_rate": 16000}, (2, 300), r"space 'mel' needs signals .* of at least 513, got 300"),
        ("mrstft", {}, (2, 1000), r"space 'mrstft' needs signals .* of at least 1025, got 1000"),
        ("mel", {"sample_rate": 16000, "f_max": 9000.0}, (2, 4000), r"f_max: expected f_min < f_max <= sample_rate"),
        ("mel", {"sample_rate": 16000, "n_fft": 0}, (2, 4000), r"n_fft: expected a positive integer, got 0"),
        ("mrstft", {"fft_sizes": (512, 512)}, (2, 4000), r"expected equally long lists of distinct FFT sizes"),
        ("mrstft", {"hop_sizes": (128,)}, (2, 4000), r"expected equally long lists"),
        ("mel", {"sample_rate": 16000}, (2, 1, 1, 4000), r"expects audio \[N, T\] or \[N, C, T\]"),
        ("mel", {"sample_rate": 16000}, (4000,), r"expects audio \[N, T\] or \[N, C, T\]"),
    ],
)
def test_bad_audio_inputs(space: str, options: dict, shape: tuple[int, ...], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        perception_mse(torch.zeros(shape), torch.zeros(shape), space=space, **options)


def test_unscaled_pcm_floats_are_caught() -> None:
    space = get_space("mel", sample_rate=16000)
    with pytest.raises(ValueError, match=r"space 'mel' expects values in \[-1, 1\].*data_range"):
        perception_mse(tones(2, 4000) * 32767, tones(2, 4000) * 32767, space=space)
