"""PerceptionMSE: a torchmetrics Metric with exact state and one all-reduce per compute."""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import checks
from .exact import device_constant, on_host
from .exact_metric import TORCHMETRICS_OPTIONS, ExactSumMetric
from .functional import SampleStats, measure, reduce_samples
from .precision import own_precision
from .reduction import SquareSums, integer_squared_error_parts, square_sums
from .spaces import Space, get_space
from .spaces.registry import split_options


@dataclass(frozen=True)
class BatchStats:
    """A batch measured by :meth:`PerceptionMSE.batch_stats` and not yet accumulated.

    Attributes:
        stats: the per-sample results (:class:`~pl_pmse.functional.SampleStats`).
        preds, target: the samples they were measured on (the counted ones; all with ``validate_args=False``).
        counted: with ``validate_args=False`` and a ``mask``: which samples count (the others are not valid).
        settings: what the metric measured with; :meth:`PerceptionMSE.accumulate` refuses other settings.
    """

    stats: SampleStats
    preds: Tensor
    target: Tensor
    counted: Tensor | None
    settings: tuple[Any, ...] = field(repr=False)


class PerceptionMSE(ExactSumMetric):
    r"""Perception MSE: the weighted sum of mean squared errors in the components of a perception space.

    .. math::
        \mathrm{PMSE} = \sum_c w_c \,
        \frac{\sum_i \lVert \phi_c(\hat y_i) - \phi_c(y_i) \rVert^2}{\sum_i |\phi_c(y_i)|}

    The state is ONE int64 tensor of exact accumulators (see :mod:`pl_pmse.exact`): per component the sum of
    squared errors and the element count, plus the sample and skipped-sample counts. Any batch split, any
    update order and any number of processes give the same bits; syncing is one ``all_reduce``.

    Args:
        space: a space name (``"pixel"``, ``"vgg16"``, ``"mel"``, ... see ``pl_pmse.available_spaces()``),
            a :class:`~pl_pmse.spaces.Space`, or an ``nn.Module`` (wrapped in a Backbone, pass ``layers=``).
        data_range: value range of the inputs: ``d`` for ``[0, d]`` or ``(min, max)``. Enables ``psnr`` of the
            raw component, is required for integer inputs (and for the ``lpips-*`` spaces), and tells feature spaces
            how to scale their input. ``psnr`` follows torchmetrics' ``PeakSignalNoiseRatio``: with a ``(min, max)``
            pair it is computed on inputs clamped to the range (the ``pixel`` component never is).
        nan_strategy: ``"error"`` (default) raises on NaN/Inf; ``"warn"`` and ``"ignore"`` skip such samples
            (counted in ``compute_summary()["skipped"]``).
        validate_args: ``False``: no host synchronisation in ``update`` / ``forward`` (the range check and the
            search for NaN/Inf are host round trips). Samples whose squared errors are not finite are then found on
            the device, left out of the state and counted as skipped, and ``compute`` reports them per
            ``nan_strategy`` (``"error"`` raises there, ``"warn"`` warns there); the value range is not checked.
            Types, shapes and devices are always checked.
        kwargs: options of the space (``component_weights=``, ``weights=``, ``layers=``, ``sample_rate=``, ...)
            and of ``torchmetrics.Metric`` (``sync_on_compute``, ``process_group``, ...).

    Example:
        >>> import torch
        >>> metric = PerceptionMSE(data_range=1.0)
        >>> metric.update(torch.full((4, 3, 8, 8), 0.5), torch.zeros(4, 3, 8, 8))
        >>> metric.compute()
        tensor(0.2500)
        >>> metric.compute_summary()["psnr"]
        tensor(6.0206)
        >>> metric.set_dtype(torch.float64).compute()  # the same exact value, rounded to float64
        tensor(0.2500, dtype=torch.float64)
    """

    higher_is_better = False
    is_differentiable = True
    plot_lower_bound = 0.0

    def __init__(
        self,
        space: str | nn.Module = "pixel",
        data_range: float | tuple[float, float] | None = None,
        nan_strategy: str = "error",
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        metric_options, space_options = split_options(kwargs, TORCHMETRICS_OPTIONS)
        clamped = isinstance(data_range, Sequence) and not isinstance(data_range, str)  # as torchmetrics' PSNR
        data_range = checks.check_data_range(data_range)
        nan_strategy = checks.check_choice("nan_strategy", nan_strategy, checks.NAN_STRATEGIES)
        resolved = get_space(space, **space_options)
        checks.check_data_range_given(resolved, data_range)
        k = len(resolved.component_names)
        # sums: one per component (+ the clamped raw error for PSNR); counts: sizes, samples, skipped
        super().__init__(num_sums=k + clamped, num_counts=k + 2, **metric_options)
        self.data_range, self.nan_strategy, self.validate_args = data_range, nan_strategy, bool(validate_args)
        if not self.validate_args and self.dist_sync_on_step:
            raise ValueError(
                "validate_args=False: no host synchronisation per step, but dist_sync_on_step=True syncs every step; "
                "use one or the other"
            )
        self.psnr_clamps = clamped and data_range is not None
        self._range_checked = False  # the first batch after each reset is compared with the assumed range
        # Held outside the module tree: never in state_dict, parameters() or an optimizer; moved by _apply.
        self.__dict__["_space"] = resolved
        self._add_configuration_checksum()

    @property
    def space(self) -> Space:
        """The perception space (frozen, eval mode, not part of the state_dict)."""
        return self.__dict__["_space"]

    def update(self, preds: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        """Accumulate a batch; a rejected batch raises and leaves the state untouched.

        ``mask`` (bool ``[N]``) says which samples count; the others are left out entirely (not counted as skipped),
        e.g. the padding repeats of a ``DistributedSampler``: see :func:`pl_pmse.distributed.sample_mask`. To see
        the batch's per-sample results too, call :meth:`batch_stats` then :meth:`accumulate` instead.
        """
        with self._padded(preds, mask) as mask:
            self._accumulate(self.batch_stats(preds, target, mask))

    def batch_stats(self, preds: Tensor, target: Tensor, mask: Tensor | None = None) -> BatchStats:
        """Measure a batch without accumulating it: its per-sample results, for :meth:`accumulate`.

        ``batch.stats`` holds the counted samples' squared-error sums per component (``batch.stats.total(
        metric.space.component_weights)`` is each sample's Perception MSE); with ``validate_args=False`` every
        sample, those outside ``mask`` or with non-finite squared errors marked not valid (on the device).

        Example:
            >>> import torch
            >>> metric = PerceptionMSE()
            >>> batch = metric.batch_stats(torch.ones(2, 4), torch.zeros(2, 4))
            >>> batch.stats.total(metric.space.component_weights)
            tensor([1., 1.], dtype=torch.float64)
            >>> metric.accumulate(batch)
            >>> metric.compute()
            tensor(1.)
        """
        checks.check_batch(preds, target, self.data_range, self.space, (type(self).__name__, self.totals.device))
        if self.validate_args:
            preds, target = _counted(preds, target, mask)
            stats = measure(preds, target, self.space, self.data_range, self.nan_strategy)
            return BatchStats(stats, preds, target, None, self._settings)
        if mask is not None:
            checks.check_mask(mask, preds)
        # samples with NaN/Inf inputs are computed on zeros (no NaN reaches a gradient) and reported by compute
        stats = measure(preds, target, self.space, self.data_range, "ignore", validate_args=False)
        if mask is not None:
            stats = dataclasses.replace(stats, valid=stats.valid & mask)
        return BatchStats(stats, preds, target, mask, self._settings)

    def accumulate(self, batch: BatchStats) -> None:
        """Add a batch measured by :meth:`batch_stats` (of this metric, or of one built alike) to the state: the
        same bits as :meth:`update` of the same inputs."""
        if not isinstance(batch, BatchStats) or batch.settings != self._settings:
            raise ValueError(
                f"batch: expected the result of batch_stats() of this PerceptionMSE (or of one with the same space "
                f"object and options), got {type(batch).__name__}"
                + (" of another space or options" if isinstance(batch, BatchStats) else "")
            )
        if self._is_synced:
            raise RuntimeError("PerceptionMSE: accumulate called while the state is synced; call unsync() first")
        self._accumulate(batch)
        self._update_count += 1
        self._computed = None

    def forward(self, preds: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """Accumulate the batch and return its Perception MSE (in the results' dtype) over the counted samples,
        differentiable when ``preds`` requires grad; the state receives the same bits as from :meth:`update` (for a
        network space with ``preds`` requiring grad, the same values to rounding: each half runs its own forward)."""
        if self.dist_sync_on_step:
            return super().forward(preds, target, mask)
        if self._is_synced:
            raise RuntimeError("PerceptionMSE: forward called while the state is synced; call unsync() first")
        with self._padded(preds, mask) as mask:
            batch = self.batch_stats(preds, target, mask)
            self._accumulate(batch)  # as accumulate(batch), one frame less: warnings point at the caller
        self._update_count += 1
        self._computed = None
        total = reduce_samples(batch.stats.total(self.space.component_weights), batch.stats.valid, "mean")
        self._forward_cache = total.to(self._result_dtype)
        return self._forward_cache

    @property
    def _settings(self) -> tuple[Any, ...]:
        """What a :class:`BatchStats` must have been measured with to be accumulated here."""
        return id(self.space), self.data_range, self.nan_strategy, self.validate_args, self.psnr_clamps

    def compute(self) -> Tensor:
        """Perception MSE over everything accumulated (synced across processes), a 0-dim tensor of the result dtype
        (see :meth:`set_dtype`)."""
        return self._summary()["total"]

    def compute_components(self) -> dict[str, Tensor]:
        """Per-component MSE, ``{component: 0-dim tensor}``, synced across processes."""
        summary = self.compute_summary()
        return {name: summary[name] for name in self.space.component_names}

    def compute_summary(self) -> dict[str, Tensor]:
        """``total``, every component, ``psnr`` (with ``data_range``) and ``skipped``, with ONE sync."""
        with self.synced():
            summary = self._summary()
        self._report_skips(summary)
        return summary

    def _wrap_compute(self, compute: Callable) -> Callable:
        """torchmetrics' compute (synced, cached), then the report of samples skipped on the device (outside the
        synced state: an error inside it would leave the state summed over the processes)."""
        wrapped = super()._wrap_compute(compute)

        @functools.wraps(compute)
        def reported(*args: Any, **kwargs: Any) -> Any:
            value = wrapped(*args, **kwargs)
            try:
                self._report_skips(self._last_summary)
            except ValueError:
                self._computed = None
                raise
            return value

        return reported

    def _report_skips(self, summary: Mapping[str, Tensor]) -> None:
        """With ``validate_args=False`` samples with NaN/Inf are found on the device: raise (``"error"``) or warn
        (``"warn"``) here, once the count over all processes is known."""
        if self.validate_args or self.nan_strategy == "ignore":
            return
        skipped = int(summary["skipped"])
        if not skipped:
            return
        message = (
            f"PerceptionMSE: {skipped} sample(s) had NaN or Inf in their squared errors and were left out of the "
            f"state (validate_args=False finds them on the device and reports them at compute)"
        )
        if self.nan_strategy == "error":
            raise ValueError(f"{message}; clean the inputs, or pass nan_strategy='ignore' or 'warn' to skip them")
        warnings.warn(f"{message}; nan_strategy='warn'", UserWarning, stacklevel=4)

    def plot(
        self,
        val: Tensor | Sequence[Tensor] | dict[str, Tensor] | Sequence[dict[str, Tensor]] | None = None,
        ax: Any = None,
        components: bool = False,
    ) -> Any:
        """Plot Perception MSE (matplotlib, through torchmetrics' plotting helpers, so ``MetricCollection.plot()``
        works too).

        Args:
            val: a result of :meth:`compute` / :meth:`forward`, a dict of :meth:`compute_components`, or a list of
                either (one per step: drawn as curves over steps). ``None`` plots the current value.
            ax: a matplotlib axis to draw into (a new figure otherwise).
            components: with ``val=None``, plot every component instead of the total.

        Returns:
            ``(figure, axis)`` (``figure`` is None when ``ax`` was given).

        Example:
            >>> import torch
            >>> metric = PerceptionMSE("pyramid")
            >>> steps = []
            >>> for _ in range(3):
            ...     steps.append(metric(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)))
            >>> fig, ax = metric.plot(steps)
            >>> fig, ax = metric.plot(components=True)
        """
        from torchmetrics.utilities.plot import plot_single_or_multi_val

        if val is None:
            val = self.compute_components() if components else self.compute()
        return plot_single_or_multi_val(
            val, ax=ax, higher_is_better=self.higher_is_better, lower_bound=self.plot_lower_bound,
            name=f"Perception MSE ({self.space.name})",
        )  # fmt: skip

    def configuration(self) -> dict[str, str]:
        """The space's configuration (:meth:`Space.configuration`) plus ``data_range`` and ``nan_strategy``."""
        data_range = f"{self.data_range}{' (PSNR clamps to it)' if self.psnr_clamps else ''}"
        return {**super().configuration(), **self.space.configuration(), "data_range": data_range,
                "nan_strategy": self.nan_strategy}  # fmt: skip

    def reset(self) -> None:
        super().reset()
        self._range_checked = False

    def _accumulate(self, batch: BatchStats) -> None:
        """Add the valid samples of a batch to the state and count the others (of ``batch.counted``) as skipped,
        with device-side operations only: fixed-point words where the space gave them, else the float64 sums
        (integer inputs: the exact parts of their raw squared errors)."""
        stats, preds, target, counted = batch.stats, batch.preds, batch.target, batch.counted
        sums = stats.sums.detach() if stats.sums.requires_grad else stats.sums
        if self.validate_args and not self._range_checked and stats.valid.any():
            self._warn_outside_range(preds[stats.valid], target[stats.valid])
        clamped = None
        if self.psnr_clamps:  # torchmetrics' PSNR clamps both inputs to a (min, max) data_range
            with own_precision(preds.device):
                clamped = _clamped_squared_errors(preds.detach(), target.detach(), self.data_range, self.space)
        if stats.words is not None:
            words, digit = stats.words, stats.digit
            if clamped is not None:
                words, digit = torch.cat([words, clamped.words], 1), torch.cat([digit, clamped.digit], 1)
            self._add(None, self._batch_counts(stats, counted), (words, digit, stats.valid))
        else:
            values = sums.T[:, :, None]  # [components, N, parts]: here one exact value per sample and component
            if stats.raw_parts is not None or clamped is not None:
                raw = stats.raw_parts if stats.raw_parts is not None else sums[:, :1]
                columns = [raw, *sums[:, 1:, None].unbind(1), *([clamped.values] if clamped is not None else [])]
                width = max(column.shape[1] for column in columns)
                values = torch.stack([c if c.shape[1] == width else F.pad(c, (0, width - c.shape[1])) for c in columns])
            if on_host(self.totals.device, values.numel()):  # a few values on a CPU: chosen and binned in Python
                valid = stats.valid.tolist()
                rows = [[x for sample, kept in zip(row, valid, strict=True) if kept for x in sample]
                        for row in values.double().tolist()]  # fmt: skip
                self._add(rows, self._batch_counts(stats, counted, sum(valid)))
            else:
                values = torch.where(stats.valid[None, :, None], values, 0).flatten(1)
                self._add(values, self._batch_counts(stats, counted))

    @staticmethod
    def _batch_counts(stats: SampleStats, counted: Tensor | None, kept: int | None = None) -> list[int] | Tensor:
        """The counts a batch adds: elements per component, samples kept, samples skipped (a tensor on the device,
        Python ints when ``kept`` is given)."""
        if kept is not None:
            samples = stats.valid.numel() if counted is None else int(counted.sum())
            return [*(kept * size for size in stats.sizes), kept, samples - kept]
        counts = stats.valid.sum() * device_constant(("count weights", stats.sizes), stats.valid.device)
        counts[-1] += stats.valid.numel() if counted is None else counted.sum()
        return counts

    def _warn_outside_range(self, preds: Tensor, target: Tensor) -> None:
        """Raw-signal spaces measure in the data's own units, but PSNR and the callback's pictures assume the range:
        data far outside it (0..255 floats with the default [0, 1]) warns once per metric. Feature spaces raise on
        their own. Checked on the first batch after each reset only (a host synchronisation)."""
        self._range_checked = True
        space = self.space
        if len(space.component_names) > 1 or getattr(self, "_range_warned", False):
            return
        bounds = self.data_range or space.expected_range
        found = checks.values_outside([x for x in (preds, target) if x.is_floating_point()], bounds)
        if found:
            self._range_warned = True
            low, high = found
            warnings.warn(
                f"PerceptionMSE: space {space.name!r} assumes values in [{bounds[0]:g}, {bounds[1]:g}] "
                f"(data_range={self.data_range}) but found [{low:g}, {high:g}]: the MSE is in the data's own units, "
                f"but PSNR and the callback's pictures assume that range; pass the data_range your data uses, "
                f"{space.range_hint}",
                UserWarning,
                stacklevel=6,  # the caller of update(): through torchmetrics' and our update wrappers
            )

    def _summary(self) -> dict[str, Tensor]:
        names, weights = self.space.component_names, self.space.component_weights
        counts = self._counts()
        samples, skipped = counts[-2:]
        if samples == 0:
            warnings.warn(
                "PerceptionMSE: no sample accumulated (compute before update, only empty batches, or every "
                "sample skipped by nan_strategy); returning NaN",
                UserWarning,
                stacklevel=3,
            )
        divisors = counts[: len(names)] + counts[:1] * self.psnr_clamps  # the clamped raw error: the raw count
        ratios = self._sums(divisors)
        mse = dict(zip(names, ratios, strict=False))
        total = math.fsum(weights[name] * value for name, value in mse.items() if weights[name])
        values = {"total": total if samples else math.nan, **mse, "skipped": float(skipped)}
        if self.data_range is not None:
            span = self.data_range[1] - self.data_range[0]
            raw = ratios[-1] if self.psnr_clamps else mse[self.space.raw_name]
            # in the log domain: finite for any positive range (span**2 overflows past 1e154)
            values["psnr"] = 10 * (2 * math.log10(span) - math.log10(raw)) if raw > 0 else math.inf if raw == 0 else raw
        dtype = self._result_dtype
        summary = {key: torch.tensor(value, dtype=dtype, device=self.device) for key, value in values.items()}
        self._last_summary = summary
        return summary

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> nn.Module:
        """Moves the space with the metric; the space keeps its dtype (see :class:`~pl_pmse.spaces.Space`), as
        torchmetrics keeps its states' dtype. The meta device is refused before anything moves (by the base)."""
        this = super()._apply(fn, *args, **kwargs)
        this.space._apply(fn)
        return this

    def extra_repr(self) -> str:
        return (
            f"space={self.space!r}, data_range={self.data_range}, nan_strategy={self.nan_strategy!r}, "
            f"validate_args={self.validate_args}"
        )


def _clamped_squared_errors(preds: Tensor, target: Tensor, data_range: tuple[float, float], space: Space) -> SquareSums:
    """Each sample's squared error of the inputs clamped to ``data_range`` (PSNR's raw error), measured as the space
    measures its raw component; integers are clamped to the integers of the range and summed exactly (``values``:
    ``[N, parts]`` exact parts)."""
    if preds.is_floating_point():
        return square_sums([(preds.clamp(*data_range), target.clamp(*data_range))], space.exact_features)
    low, high = math.ceil(data_range[0]), math.floor(data_range[1])
    clamped = [
        x.clamp(max(low, torch.iinfo(x.dtype).min), min(high, torch.iinfo(x.dtype).max)) for x in (preds, target)
    ]
    return SquareSums(integer_squared_error_parts(*clamped))  # each within its own dtype: uint8 and int16 may meet


def _counted(preds: Tensor, target: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """The samples ``mask`` counts (all when it is None or all True: no copy)."""
    if mask is None or not isinstance(preds, Tensor) or not isinstance(target, Tensor):
        return preds, target  # the pair's own checks report non-tensors
    checks.check_mask(mask, preds)
    return (preds, target) if bool(mask.all()) else (preds[mask], target[mask])
