"""ErrorProfile: where the error lives over a whole dataset, accumulated exactly like PerceptionMSE.

The shared base, :class:`ErrorProfile`, holds the exact state, leaves out samples with NaN/Inf and names the parts
of the result; what is measured per sample comes from the modality's :class:`Analysis` (:mod:`.image`: the pooled
error map and radial spectra; :mod:`.audio`: per mel band). A new modality is one Analysis registered in
:data:`ANALYSES`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import checks
from ..exact_metric import TORCHMETRICS_OPTIONS, ExactSumMetric
from ..precision import own_precision
from ..spaces.registry import split_options

Scratch = Callable[..., Tensor]  # (name, shape, like, dtype=None) -> a temporary of one update


class Analysis:
    """What a profile measures per sample for one modality: a vector per sample made of named ``parts``.

    Subclasses set ``layout`` / ``allowed_ndim``, check their options in ``__init__`` and implement :meth:`values`
    and :meth:`frequency`; ``options`` (a dict) is part of the profile's configuration."""

    layout: str = ""
    allowed_ndim: tuple[int, ...] = ()
    parts: dict[str, tuple[int, ...]]
    options: dict[str, Any]

    def fits(self, x: Tensor) -> bool:
        """Whether a batch of this shape can be profiled (the callback leaves other batches out)."""
        return x.dim() in self.allowed_ndim

    def check(self, x: Tensor) -> None:
        """Raise on a batch that cannot be profiled, naming what was expected."""
        checks.check_ndim(x, self.allowed_ndim, self.layout, f"{type(self).__name__} profile")

    def dtype(self, x: Tensor) -> torch.dtype:
        """The dtype the values are computed in."""
        return torch.float32

    def values(self, preds: Tensor, target: Tensor, scratch: Scratch) -> Tensor:
        """``[N, sum of the parts' sizes]`` float32 per-sample values, the parts concatenated in order."""
        raise NotImplementedError

    def frequency(self) -> Tensor:
        """The frequency (float64) of each entry of the per-band parts."""
        raise NotImplementedError

    def to(self, device: torch.device) -> Analysis:
        """The analysis on ``device`` (itself, unless it holds tensors)."""
        return self


ANALYSES: dict[str, type[Analysis]] = {}  # modality -> Analysis, filled by .image and .audio


class ErrorProfile(ExactSumMetric):
    """Dataset-wide error map and error-by-frequency profile; exact and one ``all_reduce`` per compute.

    Args:
        modality: ``"image"`` (``[N, C, H, W]``: options ``grid`` (side of the pooled error map, default 32) and
            ``bands`` (radial frequency bands, default 32)) or ``"audio"`` (``[N, T]`` or ``[N, C, T]``: options
            ``sample_rate`` (required), ``n_fft`` (1024), ``hop_length`` (``n_fft // 4``), ``n_mels`` (64)).
        data_range: value range of the inputs (``d`` or ``(min, max)``); integer inputs need it. The map and the
            spectra are in the data's own units (squared).
        options: the modality's options (above) and ``torchmetrics.Metric``'s.

    Example:
        >>> import torch
        >>> profile = ErrorProfile("image", grid=4, bands=8)
        >>> target = torch.rand(2, 3, 32, 32)
        >>> profile.update(target + 0.1 * torch.randn(2, 3, 32, 32), target)
        >>> profile.compute()["error_map"].shape
        torch.Size([4, 4])
    """

    def __init__(
        self, modality: str = "image", data_range: float | tuple[float, float] | None = None, **options: Any
    ) -> None:
        modality = checks.check_choice("modality", modality, tuple(ANALYSES))
        kind = ANALYSES[modality]
        own = inspect.signature(kind).parameters
        metric_options, analysis_options = split_options(options, TORCHMETRICS_OPTIONS)
        unknown = sorted(set(analysis_options) - set(own))
        if unknown:
            raise ValueError(
                f"{', '.join(unknown)}: not an option of the {modality} profile; its options are {', '.join(own)}"
            )
        analysis = kind(**analysis_options)
        super().__init__(num_sums=sum(math.prod(shape) for shape in analysis.parts.values()), num_counts=1,
                         **metric_options)  # fmt: skip
        self.modality, self.data_range = modality, checks.check_data_range(data_range)
        self.__dict__["analysis"] = analysis  # outside the module tree: its tensors are no state
        self._add_configuration_checksum()

    def set_dtype(self, dst_type: Any) -> ErrorProfile:
        """A no-op: the results are float64, the arrays the panels draw (the state is exact integers)."""
        return self

    def configuration(self) -> dict[str, str]:
        options = {"modality": self.modality, "data_range": self.data_range, **self.analysis.options}
        return {**super().configuration(), **{name: repr(value) for name, value in options.items()}}

    def fits(self, preds: Tensor) -> bool:
        """Whether a batch of this shape can be profiled (the callback leaves other batches out of the profile)."""
        return self.analysis.fits(preds)

    def update(self, preds: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        """Accumulate a batch (no gradients); samples with NaN/Inf are left out, and those ``mask`` (bool ``[N]``)
        leaves out (as in :meth:`PerceptionMSE.update <pl_pmse.PerceptionMSE.update>`)."""
        checks.check_tensor_pair(preds, target, self.data_range)
        checks.check_state_device(preds, type(self).__name__, self.totals.device)
        self.analysis.check(preds)
        with self._padded(preds, mask) as mask:
            if mask is not None:
                checks.check_mask(mask, preds)
        if mask is not None:
            preds, target = preds[mask], target[mask]
        if preds.shape[0] == 0:
            return
        dtype = self.analysis.dtype(preds)
        preds, target = preds.detach().to(dtype), target.detach().to(dtype)
        with own_precision(preds.device):
            values = self.analysis.to(preds.device).values(preds, target, self._scratch)
        finite = values.sum(1, dtype=torch.float64).isfinite()  # a NaN/Inf input makes its row's sum non-finite
        if not bool(finite.all()):
            values = values[finite]
        if values.shape[0]:
            self._add(values.T, [values.shape[0]])  # float32: summed over the batch first where that is exact

    def compute(self) -> dict[str, Tensor]:
        """Mean over samples of every part (images: ``error_map``, ``error``, ``target``, ``preds`` spectra; audio:
        per-band profiles), and the ``frequency`` of each band."""
        return self.profile_of(self.totals)

    def profile_of(self, state: Tensor) -> dict[str, Tensor]:
        """:meth:`compute` of a state, e.g. one taken by :meth:`synced_state` (no collective: any rank or thread)."""
        samples = self._counts(state)[0]
        values = torch.tensor(self._sums([samples] * self._num_sums, state), dtype=torch.float64)
        parts = self.analysis.parts
        split = values.split([math.prod(shape) for shape in parts.values()])
        named = {name: part.view(shape) for (name, shape), part in zip(parts.items(), split, strict=True)}
        return {**named, "frequency": self.analysis.frequency()}

    def _scratch(self, name: str, shape: Sequence[int], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """A temporary of ``update``. On the CPU the same buffer serves every batch of one shape: there, fresh
        memory (page faults, cold caches after the model's forward) costs more than the arithmetic (measured 2.3-2.9
        -> 1.7-1.8 ms per 16 crops of 64x64 in a validation loop). Elsewhere a new tensor: the caching allocator
        recycles memory already."""
        if like.device.type != "cpu":
            return new_tensor(name, shape, like, dtype)
        dtype = dtype or like.dtype
        buffers = self.__dict__.setdefault("_buffers_of_update", {})  # outside the module tree: no state
        buffer = buffers.get(name)
        if buffer is None or buffer.shape != tuple(shape) or buffer.dtype != dtype:
            with torch.inference_mode(False):  # a normal tensor may be written in and out of inference mode
                buffer = buffers[name] = torch.empty(shape, dtype=dtype)
        return buffer

    def __getstate__(self) -> dict[str, Any]:
        return {key: value for key, value in super().__getstate__().items() if key != "_buffers_of_update"}


def new_tensor(name: str, shape: Sequence[int], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A :data:`Scratch` that always allocates."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
