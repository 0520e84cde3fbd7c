"""The audio-aspects space (timbre, pitch, rhythm) and the mel-cepstral distortion: torchaudio's MFCC as the
reference, and synthetic changes each aspect must tell apart."""

from __future__ import annotations

import math

import pytest
import torch
import torchaudio

from pl_pmse import MelCepstralDistortion, PerceptionMSE, perception_mse, perception_mse_components
from pl_pmse.spaces import AudioAspects, get_space
from pl_pmse.spaces.audio_aspects import PITCH_CLASSES

RATE = 16000


def _voice(pitch: float, seconds: float = 1.0, harmonics: int = 12) -> torch.Tensor:
    """A steady harmonic tone with a falling 1/k spectrum (a sung vowel, roughly; no vibrato, which is a 5 Hz
    modulation of its own)."""
    time = torch.arange(int(seconds * RATE), dtype=torch.float64) / RATE
    return (0.15 * sum(torch.sin(2 * math.pi * k * pitch * time) / k for k in range(1, harmonics + 1))).float()


def _mfcc(x: torch.Tensor, n_cepstra: int = 24) -> torch.Tensor:
    """torchaudio's MFCC with the space's mel analysis: ``[..., frames, n_cepstra + 1]`` (c0 first)."""
    mfcc = torchaudio.transforms.MFCC(
        RATE, n_mfcc=n_cepstra + 1, norm="ortho", log_mels=True,
        melkwargs={"n_fft": 1024, "hop_length": 256, "n_mels": 80, "mel_scale": "htk"},
    )  # fmt: skip
    return mfcc(x).transpose(-1, -2)


def _noise(shape, seed: int, scale: float = 0.3) -> torch.Tensor:
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_timbre_is_torchaudios_mfcc_at_the_cepstrums_scale_without_c0() -> None:
    x = _noise((2, RATE), 0)  # white noise: every band far above both logs' floors
    timbre = get_space("audio-aspects", sample_rate=RATE).features(x)["timbre"]
    # torchaudio: the orthonormal DCT (sqrt(2 / M) where the cepstrum has 2 / M) of the log power (here: amplitude)
    expected = 0.5 * math.sqrt(2 / 80) * _mfcc(x)[..., 1:]
    torch.testing.assert_close(timbre, expected, rtol=0, atol=2e-5)


def test_the_cepstrum_resynthesises_a_smooth_log_spectrum() -> None:
    """With every coefficient, ``c0 / 2 + sum_k c_k cos(pi k (b + 1/2) / M)`` gives the log mel amplitude back:
    the convention in which the mel-cepstral distortion is defined."""
    from pl_pmse.spaces.audio_aspects import MelCepstrum

    cepstrum = MelCepstrum(RATE, n_mels=16, n_cepstra=15)
    log_mel = torch.randn(3, 16, 5, dtype=torch.float64)
    c = cepstrum.cepstrum(log_mel)  # [3, 5, 15]
    bands = torch.arange(16, dtype=torch.float64)
    basis = torch.cos(torch.pi * torch.arange(1, 16, dtype=torch.float64)[:, None] * (bands + 0.5) / 16)
    rebuilt = log_mel.mean(-2, keepdim=True) + torch.einsum("nfk,kb->nbf", c, basis)  # c0 / 2 is the mean
    torch.testing.assert_close(rebuilt, log_mel, rtol=0, atol=1e-6)


def test_mcd_is_the_standard_formula_on_torchaudios_mfcc() -> None:
    target = _noise((3, RATE), 1)
    preds = target + _noise((3, RATE), 2, 0.2)
    metric = MelCepstralDistortion(sample_rate=RATE)
    metric.update(preds[:1], target[:1])
    metric.update(preds[1:], target[1:])
    difference = 0.5 * math.sqrt(2 / 80) * (_mfcc(preds) - _mfcc(target))[..., 1:]  # amplitude cepstra c1 ... c24
    per_frame = 10 / math.log(10) * torch.sqrt(2 * difference.double().square().sum(-1))
    torch.testing.assert_close(metric.compute(), per_frame.mean(-1).mean().float(), rtol=1e-4, atol=0)
    assert 0 < float(metric.compute()) < 100


def test_mcd_is_the_same_for_any_batch_split_and_zero_for_a_gain() -> None:
    target = _noise((5, 8000), 3)
    preds = target + _noise((5, 8000), 4, 0.1)
    whole, split = MelCepstralDistortion(sample_rate=RATE), MelCepstralDistortion(sample_rate=RATE)
    whole.update(preds, target)
    for p, t in zip(preds.split(2), target.split(2), strict=True):
        split.update(p, t)
    assert torch.equal(whole.compute(), split.compute())
    gain = MelCepstralDistortion(sample_rate=RATE)
    gain.update(target * 0.25, target)
    assert float(gain.compute()) < 1e-3


# each change and the aspect it is made to move
CHANGES = {
    "semitone up": ("pitch", lambda t, f0: _voice(f0 * 2 ** (1 / 12))),
    "4 Hz tremolo": (
        "rhythm",
        lambda t, f0: t * (0.6 + 0.4 * torch.sin(2 * math.pi * 4 * torch.arange(t.numel()) / RATE)),
    ),
    "added noise": ("timbre", lambda t, f0: t + _noise(t.shape, 5, 0.03)),
    "gain": (None, lambda t, f0: 0.5 * t),
}


@pytest.fixture(scope="module")
def measured() -> dict[str, dict[str, float]]:
    space = get_space("audio-aspects", sample_rate=RATE)
    pitches = (220.0, 147.0, 311.0)
    target = torch.stack([_voice(f0) for f0 in pitches])
    results = {}
    for change, (_, make) in CHANGES.items():
        preds = torch.stack([make(t, f0) for t, f0 in zip(target, pitches, strict=True)])
        components = perception_mse_components(preds, target, space=space)
        results[change] = {name: float(value) for name, value in components.items()}
    return results


@pytest.mark.parametrize("change", [name for name, (aspect, _) in CHANGES.items() if aspect])
def test_each_change_shows_in_its_aspect_at_least_5x_more_than_the_changes_aimed_elsewhere(change, measured) -> None:
    aspect = CHANGES[change][0]
    others = {name: values[aspect] for name, values in measured.items() if CHANGES[name][0] not in (aspect,)}
    if aspect == "rhythm":  # added noise adds flux too (random rises); it is timbre's change
        others.pop("added noise")
    if aspect == "timbre":  # a new pitch moves the harmonics under the mel bands: a real change of the spectrum
        others.pop("semitone up")
    assert all(measured[change][aspect] >= 5 * value for value in others.values()), (measured[change], others)


def test_a_gain_change_registers_in_no_aspect(measured) -> None:
    smallest = min(measured[change][aspect] for change, (aspect, _) in CHANGES.items() if aspect)
    for aspect in ("timbre", "pitch", "rhythm"):
        assert measured["gain"][aspect] < 1e-6 * smallest, measured["gain"]


def test_the_pitch_profile_of_a_tone_peaks_at_its_pitch_class() -> None:
    space = get_space("audio-aspects", sample_rate=RATE)
    for midi in (45, 57, 58, 64, 71):  # A2, A3, A#3, E4, B4
        tone = torch.sin(2 * math.pi * 440 * 2 ** ((midi - 69) / 12) * torch.arange(RATE) / RATE)[None]
        profile = space.features(tone)["pitch"][0, 10:-10].mean(0)
        assert PITCH_CLASSES[int(profile.argmax())] == PITCH_CLASSES[midi % 12]
        torch.testing.assert_close(space.features(tone)["pitch"][0, 10].square().mean(), torch.tensor(1.0),
                                   rtol=1e-5, atol=0)  # fmt: skip


def test_the_views_lie_on_the_frame_grid_of_the_pitch_profile() -> None:
    space = get_space("audio-aspects", sample_rate=RATE)
    clip = torch.zeros(1, RATE)
    clip[0, 8000:] = _voice(330.0, 0.5)
    views = space.views(clip + _noise((1, RATE), 9, 1e-4))
    pitch, onsets = views["pitch class (C to B, bottom to top)"], views["onset strength"]
    assert pitch.shape == (1, 12, RATE // space.hop_length + 1) and onsets.shape == (1, pitch.shape[-1])
    # the rise into the first frame whose window (1024 samples) reaches the note
    assert abs(int(onsets[0].argmax()) * space.hop_length - 8000) <= 2 * space.hop_length
    edge = space.edge_frames
    assert not onsets[0, : edge + 1].any() and not onsets[0, -edge:].any()


def test_the_onset_envelope_rises_where_notes_start() -> None:
    space = get_space("audio-aspects", sample_rate=RATE)
    clip = torch.zeros(RATE)
    starts = (4000, 10000)
    for start in starts:
        clip[start : start + 3000] = _voice(330.0, 3000 / RATE)
    envelope = space.features(clip[None] + _noise((1, RATE), 6, 1e-4))["rhythm"][0]
    peaks = envelope.topk(2).indices.sort().values + 1 + space.edge_frames  # the rise into frame t + 1 + edge
    assert all(abs(int(p) * space.hop_length - s) <= 2 * space.hop_length for p, s in zip(peaks, starts, strict=True))


@pytest.mark.parametrize("quiet", [0.0, 1e-20, 1e-12])
def test_the_aspects_are_differentiable_and_finite_on_silence(quiet) -> None:
    """A silent (or all but silent) prediction, as a model may give at its start: finite values and gradients."""
    space = get_space("audio-aspects", sample_rate=RATE)
    target = torch.stack([_voice(200.0, 0.5), torch.zeros(RATE // 2), _voice(300.0, 0.5)])
    preds = torch.stack([_voice(210.0, 0.5), torch.full((RATE // 2,), quiet), torch.full((RATE // 2,), quiet)])
    preds.requires_grad_(True)
    for name in ("timbre", "pitch", "rhythm"):
        weights = {"timbre": 0.0, "pitch": 0.0, "rhythm": 0.0, name: 1.0}
        loss = perception_mse(preds, target, get_space("audio-aspects", sample_rate=RATE, component_weights=weights))
        (grad,) = torch.autograd.grad(loss, preds)
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad[0].abs().sum() > 0, name
    assert torch.isfinite(perception_mse(preds, target, space=space))


def test_the_same_bits_for_any_batch_split() -> None:
    target = torch.stack([_voice(f0, 0.5) for f0 in (110.0, 220.0, 330.0, 440.0)])
    preds = target + _noise(target.shape, 7, 0.01)
    whole = PerceptionMSE("audio-aspects", sample_rate=RATE)
    whole.update(preds, target)
    split = PerceptionMSE("audio-aspects", sample_rate=RATE)
    for p, t in zip(preds.split(3), target.split(3), strict=True):
        split.update(p, t)
    assert all(torch.equal(a, b) for a, b in zip(whole.compute_components().values(),
                                                  split.compute_components().values(), strict=True))  # fmt: skip


def test_pitch_octaves_follow_the_sample_rate() -> None:
    assert get_space("audio-aspects", sample_rate=16000).semitones.fb.shape == (2049, 72)
    assert get_space("audio-aspects", sample_rate=4000).semitones.fb.shape[1] == 60  # B6 is the top below 2 kHz
    assert AudioAspects(sample_rate=44100).pitch_spectrogram.n_fft == 16384


BAD = [
    ({}, r"sample_rate: space 'audio-aspects' needs the audio's sample rate in Hz \(e.g. 16000\), got None"),
    ({"sample_rate": -1}, r"sample_rate: .* got -1"),
    ({"sample_rate": 200}, r"sample_rate: audio-aspects' pitch needs at least 124 Hz of bandwidth, got 200 Hz"),
    ({"sample_rate": RATE, "n_cepstra": 80}, r"n_cepstra: expected an integer from 1 to 79, got 80"),
    ({"sample_rate": RATE, "n_mels": 0}, r"n_mels: expected an integer from 1 to 512, got 0"),
    ({"sample_rate": RATE, "floor_db": 0}, r"floor_db: expected dB below the peak in \(0, 300\), got 0"),
    ({"sample_rate": RATE, "pitch_n_fft": 1}, r"n_fft: expected 2 \(one frequency besides 0\) to 65536"),
    ({"sample_rate": RATE, "hop_length": 0}, r"hop_length: expected a positive integer, got 0"),
]


@pytest.mark.parametrize(("options", "message"), BAD)
def test_bad_options_name_the_option(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        get_space("audio-aspects", **options)


def test_mcd_follows_device_moves_but_not_a_parents_dtype_casts() -> None:
    target = _noise((2, 8000), 10)
    preds = target + _noise((2, 8000), 11, 0.05)
    holder = torch.nn.Module()
    holder.mcd = MelCepstralDistortion(sample_rate=RATE)
    holder.to(torch.bfloat16).half()
    holder.mcd.update(preds, target)
    reference = MelCepstralDistortion(sample_rate=RATE)
    reference.update(preds, target)
    assert holder.mcd.cepstrum.dct.dtype == torch.float32
    assert torch.equal(holder.mcd.compute(), reference.compute())


def test_mcd_bad_inputs_name_what_was_expected_and_leave_the_state_alone() -> None:
    with pytest.raises(ValueError, match=r"sample_rate: MelCepstralDistortion needs the audio's sample rate"):
        MelCepstralDistortion()
    with pytest.raises(ValueError, match=r"window: not an option of MelCepstralDistortion"):
        MelCepstralDistortion(sample_rate=RATE, window=3)
    metric = MelCepstralDistortion(sample_rate=RATE)
    target = _noise((2, 4000), 8)
    metric.update(target + 0.01, target)
    before = metric.compute()
    for preds, target_, message in (
        (
            torch.zeros(2, 100),
            torch.zeros(2, 100),
            r"MelCepstralDistortion needs clips of at least n_fft // 2 \+ 1 = 513 samples, got 100",
        ),
        (torch.zeros(2, 1, 1, 600), torch.zeros(2, 1, 1, 600), r"expects audio \[N, T\] or \[N, C, T\]"),
        (torch.zeros(2, 600), torch.zeros(3, 600), r"shape"),
    ):
        with pytest.raises(ValueError, match=message):
            metric.update(preds, target_)
    assert torch.equal(metric.compute(), before)


# SPTK's mel-cepstral distortion of these clips (pysptk 1.0.1: pysptk.mcep(frame * hanning(1024), order=24,
# alpha=0.42, eps=1e-8, etype=1) of 1024-sample frames every 256 samples; 10 / ln 10 * sqrt(2 * sum over c1..c24);
# mean over frames), computed once outside the test suite: pysptk is a source distribution that compiles
SPTK_MCD = {30: 6.700, 20: 9.738, 10: 12.695}


def test_mcd_is_near_sptks_on_speech_like_audio_with_noise() -> None:
    """The same figure as SPTK's iterative mel-cepstrum gives, to within the estimators' difference (0.7x to 1.1x:
    the mel filter bank's cepstrum is 15-23% lower on this clip, within 8% on a recorded ARCTIC utterance). The clip
    is the audio example's: a change to its synthesis needs these numbers computed again (the recipe above)."""
    from examples.audio_enhancement import synthetic_clip

    clean = synthetic_clip(32000, RATE, torch.Generator().manual_seed(0))
    ours = {}
    for snr in SPTK_MCD:
        noise = torch.randn(32000, generator=torch.Generator().manual_seed(snr))
        noise = noise * clean.square().mean().sqrt() / noise.square().mean().sqrt() * 10 ** (-snr / 20)
        metric = MelCepstralDistortion(sample_rate=RATE)
        metric.update((clean + noise)[None], clean[None])
        ours[snr] = float(metric.compute())
    assert all(0.7 * SPTK_MCD[snr] <= ours[snr] <= 1.1 * SPTK_MCD[snr] for snr in SPTK_MCD), ours
    assert ours[30] < ours[20] < ours[10]
