"""MelCepstralDistortion: the standard voice-conversion and speech-synthesis figure, over a whole set, exactly.

Per frame, ``MCD = 10 / ln(10) * sqrt(2 * sum_k (c_k - c'_k) ** 2)`` dB over the mel-cepstral coefficients
``c1 ... cK`` of the prediction and the target (natural-log amplitude cepstra, ``c0``, the loudness, left out): the
frames of the ``audio-aspects`` space's ``timbre`` component (:class:`~pl_pmse.spaces.audio_aspects.MelCepstrum`).
A clip's value is the mean over its frames (and channels); the set's, the mean over clips, kept in the exact
accumulators of :mod:`pl_pmse.exact` (the same bits for any batch split, update order or number of processes). The
pair is compared frame by frame as it is: no time warping (a prediction of the target's own timing, as enhancement,
vocoders and codecs give; a system that changes the timing needs an alignment first).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from . import checks
from .exact_metric import TORCHMETRICS_OPTIONS, SampleFiguresMetric
from .precision import own_precision
from .spaces.audio_aspects import CEPSTRUM_DEFAULTS, MelCepstrum

MCD_SCALE = 10 / math.log(10) * math.sqrt(2)  # dB per unit of cepstral distance (natural-log amplitude)


class MelCepstralDistortion(SampleFiguresMetric):
    """Mel-cepstral distortion in dB of predicted clips against their targets, over the whole set (module doc).

    Args:
        sample_rate: of the audio in Hz (required).
        n_fft, hop_length, n_mels, n_cepstra, floor_db, range_db: the mel cepstrum, as in the ``audio-aspects``
            space (defaults: 1024, ``n_fft // 4``, 80, 24, 60 dB, 80 dB).
        options: ``torchmetrics.Metric``'s keyword options.

    Example:
        >>> import torch
        >>> mcd = MelCepstralDistortion(sample_rate=16000)
        >>> target = torch.randn(2, 16000, generator=torch.manual_seed(0)) * 0.1
        >>> mcd.update(target * 0.5, target)  # a gain change: no distortion
        >>> round(mcd.compute().item(), 3)
        0.0
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, sample_rate: int | None = None, nan_strategy: str = "error", **options: Any) -> None:
        analysis = {name: options.pop(name, default) for name, default in CEPSTRUM_DEFAULTS.items()}
        unknown = sorted(set(options) - set(TORCHMETRICS_OPTIONS))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not an option of MelCepstralDistortion")
        checks.check_sample_rate(sample_rate, "MelCepstralDistortion")
        cepstrum = MelCepstrum(sample_rate, **analysis)  # checks its options
        super().__init__(1, nan_strategy, **options)
        self.__dict__["cepstrum"] = cepstrum  # outside the module tree: moved with the metric, never cast (_apply)
        self.min_length = analysis["n_fft"] // 2 + 1
        self._add_configuration_checksum()

    def configuration(self) -> dict[str, str]:
        return {**super().configuration(), **{name: repr(value) for name, value in self.cepstrum.options.items()}}

    figures = ("mcd",)

    @property
    def requirement(self) -> str:
        """What :meth:`fits` asks of a batch, for messages."""
        return f"audio [N, T] or [N, C, T] of at least {self.min_length} samples"

    def fits(self, x: Tensor) -> bool:
        """Whether a batch of this shape can be measured (the callback leaves other batches out, with a warning)."""
        return x.dim() in (2, 3) and x.shape[-1] >= self.min_length

    def check(self, preds: Tensor, target: Tensor) -> None:
        """Raise on a pair that cannot be measured, naming what was expected."""
        checks.check_tensor_pair(preds, target, (-1.0, 1.0))  # integers welcome: the figure ignores the gain
        checks.check_ndim(preds, (2, 3), "audio [N, T] or [N, C, T]", "MelCepstralDistortion")
        if preds.shape[-1] < self.min_length:
            raise ValueError(
                f"preds and target: MelCepstralDistortion needs clips of at least n_fft // 2 + 1 = {self.min_length} "
                f"samples, got {preds.shape[-1]} (shape {tuple(preds.shape)})"
            )

    def sample_values(self, preds: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Each clip's mean MCD over its frames (and channels), float64 ``[N]``. No checks, no gradients."""
        dtype = torch.float64 if preds.dtype == torch.float64 else torch.float32
        with torch.no_grad(), own_precision(preds.device, inner_products=False):
            both = torch.cat([preds, target]).to(dtype)
            cepstra = self.cepstrum.cepstrum(self.cepstrum.log_mel(both)).chunk(2)
            per_frame = MCD_SCALE * (cepstra[0] - cepstra[1]).square().sum(-1).sqrt()  # [N, (C,) frames]
            frames = per_frame.reshape(preds.shape[0], -1)
            return {"mcd": torch.cumsum(frames, 1, dtype=torch.float64)[:, -1] / frames.shape[1]}

    def rows(self, values: Mapping[str, Tensor]) -> Tensor:
        """The sum of the clips' MCD values."""
        return values["mcd"][None]

    def compute(self) -> Tensor:
        """The mean MCD in dB over the clips accumulated (synced across processes); NaN before any clip."""
        clips, _ = self._counts()
        (value,) = self._sums([clips])
        return torch.tensor(value, dtype=self._result_dtype, device=self.device)

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> MelCepstralDistortion:
        """Device moves reach the cepstrum analysis, dtype casts of a parent (``.half()``, Lightning's ``16-true``)
        do not: its values stay bit-identical, as a space's do."""
        device = fn(torch.zeros(())).device
        this = super()._apply(fn, *args, **kwargs)  # refuses a device that cannot measure
        self.cepstrum._apply(lambda t: t.to(device))
        return this

    def figure_values(self) -> dict[str, Tensor]:
        """``{"mcd": compute()}`` (the callback's common form with :class:`~pl_pmse.fidelity.ImageFidelity`)."""
        return {"mcd": self.compute()}
