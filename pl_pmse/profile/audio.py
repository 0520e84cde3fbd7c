"""The audio profile: per mel band, the mean squared log-mel error and the mean mel power of target and prediction."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import checks
from ..spaces.audio import MelAnalysis, check_fft
from .base import ANALYSES, Analysis, Scratch
from .image import check_count


class AudioAnalysis(Analysis):
    """Per clip: the squared log-mel error and the target's and prediction's mel power, per mel band (a mel
    analysis of ``sample_rate``, ``n_fft``, ``hop_length``, ``n_mels``)."""

    layout = "audio [N, T] or [N, C, T]"
    allowed_ndim = (2, 3)

    def __init__(
        self, sample_rate: int | None = None, n_fft: int = 1024, hop_length: int | None = None, n_mels: int = 64
    ) -> None:
        checks.check_sample_rate(sample_rate, "the audio profile")
        check_fft(n_fft, hop_length, None)
        check_count("n_mels", n_mels, 1024)
        self.sample_rate, self.n_fft, self.hop_length, self.n_mels = (
            sample_rate,
            n_fft,
            hop_length or n_fft // 4,
            n_mels,
        )
        self.min_length = n_fft // 2 + 1
        self.options = {"sample_rate": sample_rate, "n_fft": n_fft, "hop_length": self.hop_length, "n_mels": n_mels}
        self.parts = {"error": (n_mels,), "target": (n_mels,), "preds": (n_mels,)}
        self.mel = MelAnalysis(sample_rate, n_fft, self.hop_length, n_mels=n_mels)
        hertz = self.mel.filters.fb  # each band's centre of mass in Hz, on the CPU before any move
        self._centres = (hertz * torch.linspace(0, sample_rate / 2, hertz.shape[0])[:, None]).sum(0) / hertz.sum(0)

    def fits(self, x: Tensor) -> bool:
        return super().fits(x) and x.shape[-1] >= self.min_length

    def check(self, x: Tensor) -> None:
        super().check(x)
        checks.check_min_size(x, self.min_length, "signals", "audio profile")

    def values(self, preds: Tensor, target: Tensor, scratch: Scratch) -> Tensor:
        target_power, preds_power = self.mel(target), self.mel(preds)  # [N, (C,) M, frames]
        log_error = (torch.log(preds_power + 1e-5) - torch.log(target_power + 1e-5)).square()
        per_band = [x.transpose(-1, -2).reshape(x.shape[0], -1, self.n_mels).mean(1)
                    for x in (log_error, target_power, preds_power)]  # fmt: skip
        return torch.cat(per_band, 1)

    def frequency(self) -> Tensor:
        """Each mel band's centre of mass in Hz."""
        return self._centres.double()

    def to(self, device: torch.device) -> AudioAnalysis:
        self.mel = self.mel.to(device)
        return self


ANALYSES["audio"] = AudioAnalysis
