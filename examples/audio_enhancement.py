"""Audio enhancement: remove noise and band-limiting, validated with log-mel Perception MSE and audio panels.

By default the data is synthesised in code: speech-like clips from a source-filter model (syllables of vowels with
their formants, an intonation contour, fricative bursts), so nothing is downloaded. Pass a folder of your own .wav
files with ``--data.root``: they are read with soundfile, mixed to mono, resampled to ``sample_rate`` and cut into
segments.

    python examples/audio_enhancement.py fit --config configs/audio_enhancement.yaml
    python examples/audio_enhancement.py fit --config configs/audio_enhancement.yaml --data.root ~/my_wavs
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
import torchaudio
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.common import run_cli

# formant frequencies F1, F2, F3 (Hz) of five vowels (Peterson & Barney, 1952, adult male averages)
VOWELS = {"a": (730, 1090, 2440), "e": (530, 1840, 2480), "i": (270, 2290, 3010), "o": (570, 840, 2410),
          "u": (300, 870, 2240)}  # fmt: skip
FORMANT_BANDWIDTHS = (80.0, 100.0, 140.0)  # Hz


def synthetic_clip(length: int, sample_rate: int, generator: torch.Generator) -> torch.Tensor:
    """A speech-like clip in [-1, 1], made by a source-filter model: syllables at 3-6 per second, each a vowel
    (its three formants, moving smoothly from one vowel to the next) on a glottal source whose pitch follows an
    intonation contour (falling over the clip, with a rise on stressed syllables), some begun by a fricative's
    noise burst, with pauses between phrases, over a quiet room's noise. Additive synthesis: every harmonic of the
    pitch below the Nyquist frequency, weighted by the formant filter at its frequency (-6 dB per octave of source
    tilt)."""
    rand = lambda: float(torch.rand((), generator=generator))  # noqa: E731
    t = torch.arange(length, dtype=torch.float64) / sample_rate
    duration = length / sample_rate
    # syllables: boundaries, vowels, stress, fricative onsets; a pause after some
    bounds, vowels, stressed, fricative, pause = [0.0], [], [], [], []
    while bounds[-1] < duration:
        bounds.append(bounds[-1] + 0.16 + 0.17 * rand())
        vowels.append(list(VOWELS)[int(5 * rand()) % 5])
        stressed.append(rand() < 0.35)
        fricative.append(rand() < 0.3)
        pause.append(len(pause) > 0 and rand() < 0.12)
    edges = torch.tensor(bounds, dtype=torch.float64)
    syllable = torch.bucketize(t, edges[1:-1], right=True)  # each sample's syllable
    position = (t - edges[syllable]) / (edges[syllable + 1] - edges[syllable])  # 0..1 within it
    # formants: each syllable's vowel, crossfaded over the first third of the next
    targets = torch.tensor([VOWELS[v] for v in vowels], dtype=torch.float64)
    previous = targets[(syllable - 1).clamp(min=0)]
    blend = (position / 0.33).clamp(max=1.0)[:, None]
    formants = previous + (targets[syllable] - previous) * (0.5 - 0.5 * torch.cos(torch.pi * blend))
    # pitch: a speaker's base, a declination over the clip, a rise on stressed syllables, a little jitter
    base = 95 + 130 * rand()
    stress = torch.tensor(stressed, dtype=torch.float64)[syllable] * torch.sin(torch.pi * position)
    pitch = base * (1.15 - 0.25 * t / duration) * (1 + 0.18 * stress)
    pitch = pitch * (1 + 0.004 * torch.randn(length, generator=generator, dtype=torch.float64).cumsum(0).div(
        math.sqrt(length)))  # fmt: skip
    phase = 2 * math.pi * torch.cumsum(pitch, 0) / sample_rate
    harmonics = torch.arange(1, int(sample_rate / 2 / float(pitch.min())) + 1, dtype=torch.float64)
    frequency = harmonics[:, None] * pitch[None]  # [K, T]
    gain = torch.ones_like(frequency)
    for index, bandwidth in enumerate(FORMANT_BANDWIDTHS):
        centre = formants[:, index][None]
        gain = gain / torch.sqrt((1 - (frequency / centre) ** 2) ** 2 + (frequency * bandwidth / centre**2) ** 2)
    gain = gain * (frequency < sample_rate / 2) / harmonics[:, None]
    voiced = (gain * torch.sin(harmonics[:, None] * phase[None])).sum(0)
    # the syllable's loudness: a rise and a fall; a fricative's noise burst in its first 60 ms
    envelope = torch.sin(torch.pi * position).clamp(min=0) ** 0.6
    envelope = envelope * (1 - torch.tensor(pause, dtype=torch.float64)[syllable])
    seconds_in = t - edges[syllable]
    burst = torch.tensor(fricative, dtype=torch.float64)[syllable] * (seconds_in < 0.06)
    noise = torch.randn(length, generator=generator, dtype=torch.float64)
    hiss = torchaudio.functional.highpass_biquad(noise.float(), sample_rate, min(3500.0, sample_rate / 2.5)).double()
    voiced_part = voiced * envelope * (1 - burst)
    room = 3e-4 * torch.randn(length, generator=generator, dtype=torch.float64)  # a quiet room: no digital silence
    clip = voiced_part / voiced_part.abs().max().clamp(min=1e-9) * 0.5 + 0.15 * burst * hiss + room
    return clip.float().clamp(-1, 1)


def degrade(clean: torch.Tensor, sample_rate: int, noise: float, cutoff: float, generator: torch.Generator):
    """Band-limit (low-pass at ``cutoff`` Hz) and add white noise."""
    muffled = torchaudio.functional.lowpass_biquad(clean, sample_rate, cutoff)
    return (muffled + noise * torch.randn(clean.shape, generator=generator)).clamp(-1, 1)


class AudioPairs(Dataset):
    """``(degraded, clean)`` clips of ``length`` samples, synthetic or cut from a folder of .wav files."""

    def __init__(self, count: int, length: int, sample_rate: int, noise: float, cutoff: float, seed: int,
                 files: list[Path] | None = None) -> None:  # fmt: skip
        self.count, self.length, self.sample_rate = count, length, sample_rate
        self.noise, self.cutoff, self.seed = noise, cutoff, seed
        self.recordings = [self._read(path) for path in files or []]

    def _read(self, path: Path) -> torch.Tensor:
        import soundfile

        data, rate = soundfile.read(path, dtype="float32", always_2d=True)
        mono = torch.from_numpy(data).mean(1)
        if rate != self.sample_rate:
            mono = torchaudio.functional.resample(mono, rate, self.sample_rate)
        if mono.numel() < self.length:
            raise ValueError(f"data.root: {path} is shorter than length={self.length} samples")
        return mono

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed + index)
        if self.recordings:
            recording = self.recordings[index % len(self.recordings)]
            start = int(torch.randint(recording.numel() - self.length + 1, (), generator=generator))
            clean = recording[start : start + self.length]
        else:
            clean = synthetic_clip(self.length, self.sample_rate, generator)
        return degrade(clean, self.sample_rate, self.noise, self.cutoff, generator), clean


class AudioClips(pl.LightningDataModule):
    """Synthetic clips by default; ``root`` = a folder of .wav files (searched recursively) instead."""

    def __init__(
        self, root: str | None = None, sample_rate: int = 16000, length: int = 16000, train_clips: int = 256,
        val_clips: int = 16, noise: float = 0.05, cutoff: float = 3000.0, batch_size: int = 8,
    ) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        h = self.hparams
        files = None
        if h.root is not None:
            files = sorted(Path(h.root).expanduser().rglob("*.wav"))
            if not files:
                raise ValueError(f"data.root: no .wav file under {h.root}")
        train_files, val_files = (files[1:] or files, files[:1]) if files else (None, None)
        self.train_set = AudioPairs(h.train_clips, h.length, h.sample_rate, h.noise, h.cutoff, 0, train_files)
        self.val_set = AudioPairs(h.val_clips, h.length, h.sample_rate, h.noise, h.cutoff, 10_000, val_files)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size)

    test_dataloader = val_dataloader


class Enhancer(pl.LightningModule):
    """A small residual 1-d CNN on the waveform, trained with sample MSE plus a multi-resolution STFT term."""

    def __init__(self, width: int = 32, depth: int = 6, kernel: int = 9, lr: float = 2e-3, stft_weight: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Conv1d(1, width, kernel, padding=kernel // 2), nn.GELU()]
        for index in range(depth - 2):
            dilation = 2 ** (index % 4)
            layers += [nn.Conv1d(width, width, kernel, padding=dilation * (kernel // 2), dilation=dilation), nn.GELU()]
        layers.append(nn.Conv1d(width, 1, kernel, padding=kernel // 2))
        self.net = nn.Sequential(*layers)
        from pl_pmse import get_space

        self.stft = get_space("mrstft", fft_sizes=(256, 512, 1024))  # a Perception MSE loss term

    def forward(self, degraded: torch.Tensor) -> torch.Tensor:
        return (degraded + self.net(degraded[:, None])[:, 0]).clamp(-1, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        from pl_pmse import perception_mse

        degraded, clean = batch
        enhanced = self(degraded)
        mse = nn.functional.mse_loss(enhanced, clean)
        spectral = perception_mse(enhanced, clean, space=self.stft)
        loss = mse + self.hparams.stft_weight * spectral
        self.log_dict({"train/mse": mse, "train/stft": spectral}, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        degraded, clean = batch
        return {"preds": self(degraded), "target": clean}

    test_step = validation_step

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.net.parameters(), lr=self.hparams.lr)


def main(args: list[str] | None = None) -> None:
    run_cli(Enhancer, AudioClips, "audio_enhancement", args)


if __name__ == "__main__":
    main()
