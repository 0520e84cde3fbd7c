"""PerceptionMSE: a torchmetrics Metric with exact state and one all-reduce per compute."""

from __future__ import annotations

import functools
import math
import os
import warnings
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors

from . import checks
from .exact import NUM_BINS, add_exact, exact_ratios
from .functional import SampleStats, reduce_samples, sample_stats
from .spaces import Space, get_space
from .spaces.base import split_options

_TORCHMETRICS_OPTIONS = (
    "compute_on_cpu",
    "dist_sync_on_step",
    "process_group",
    "dist_sync_fn",
    "distributed_available_fn",
    "sync_on_compute",
    "compute_with_cache",
)


class ExactSumMetric(Metric):
    """Base of metrics whose state is exact sums of non-negative values plus integer counts, in ONE tensor.

    Subclasses call :meth:`_add` in ``update`` and read :meth:`_sums` / :meth:`_counts` in ``compute``; syncing
    is one ``all_reduce`` of the int64 state (see :mod:`pl_pmse.exact`), preceded once per process group by a
    3-number check that every rank built the same configuration (:meth:`_describe`).
    """

    full_state_update = False
    totals: Tensor

    def __init__(self, num_sums: int, num_counts: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._num_sums, self._num_counts = num_sums, num_counts
        self._checked_groups: set[tuple[int, int]] = set()
        self.add_state("totals", torch.zeros(num_sums * NUM_BINS + num_counts, dtype=torch.int64), "sum")

    def set_dtype(self, dst_type: Any) -> ExactSumMetric:
        """A no-op: the state is exact integers, results are float64 whatever the inputs' dtype."""
        return self

    def _describe(self) -> str:
        """The configuration every rank must share (compared across ranks before the first sync)."""
        return f"{type(self).__name__}|{self._num_sums}|{self._num_counts}"

    def _add(self, sums: Tensor, counts: Sequence[int]) -> None:
        """Add ``sums`` (``[num_sums, P]``, non-negative, finite) and ``counts`` to the state."""
        totals = self.totals
        if totals.is_inference() and not torch.is_inference_mode_enabled():
            totals = totals.clone()  # reset inside validation: an inference tensor only changes in inference mode
        add_exact(totals[: self._num_sums * NUM_BINS].view(self._num_sums, NUM_BINS), sums.to(totals.device))
        totals[self._num_sums * NUM_BINS :] += torch.tensor(counts, dtype=torch.int64, device=totals.device)
        self.totals = totals

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.totals = self.totals.clone()  # torchmetrics adopts the given tensor; updates write into the state

    def synced_state(self) -> Tensor:
        """A CPU copy of the state summed over all processes (one all_reduce: call it on every rank)."""
        with self.synced():
            return self.totals.detach().to("cpu", copy=True)

    def _counts(self, state: Tensor | None = None) -> list[int]:
        return (self.totals if state is None else state)[self._num_sums * NUM_BINS :].tolist()

    def _sums(self, divisors: Sequence[int], state: Tensor | None = None) -> list[float]:
        """Each exact sum (of ``state``, default the metric's) divided by its divisor, correctly rounded (NaN where
        the divisor is 0)."""
        state = self.totals if state is None else state
        return exact_ratios(state[: self._num_sums * NUM_BINS].view(self._num_sums, NUM_BINS), divisors)

    def synced(self) -> Any:
        """Context in which the state is summed over all processes (one all_reduce), restored afterwards."""
        return self.sync_context(
            dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync
        )

    def check_configuration(self) -> None:
        """Check that every process built the same metric (a collective: call it on every rank).

        Runs by itself before the first sync; calling it early (e.g. in a Lightning ``setup`` hook) makes
        every later ``compute`` exactly one ``all_reduce``. A no-op outside distributed runs.
        """
        if self.distributed_available_fn():
            self._check_same_configuration(self.process_group)

    def _sync_dist(self, dist_sync_fn: Callable = gather_all_tensors, process_group: Any = None) -> None:
        """ONE all_reduce of the packed state (after the one-time configuration check)."""
        if dist_sync_fn is not gather_all_tensors:  # a custom gather function: torchmetrics' generic path
            return super()._sync_dist(dist_sync_fn, process_group)
        group = process_group or self.process_group
        self._check_same_configuration(group)
        totals = self.totals.clone()
        dist.all_reduce(totals, group=group)
        self.totals = totals

    def _check_same_configuration(self, group: Any) -> None:
        """Once per metric and process group: all ranks must hold the same configuration.

        A state of another size on some rank would crash gloo or hang NCCL inside the all_reduce; this
        fixed-size check (state size and a configuration hash, with their squares: all values agree iff
        ``world * sum(x**2) == sum(x)**2``) turns that into a clear error on every rank.
        """
        key = (os.getpid(), id(group))
        if key in self._checked_groups:
            return
        description = self._describe()
        values = [self.totals.numel(), zlib.crc32(description.encode()) & 0xFFFFF]
        check = torch.tensor([v for value in values for v in (value, value * value)], device=self.totals.device)
        dist.all_reduce(check, group=group)
        world, sums = dist.get_world_size(group), check.tolist()
        if any(world * squares != total * total for total, squares in zip(sums[::2], sums[1::2], strict=True)):
            raise RuntimeError(
                f"{type(self).__name__}: the metric configuration differs between processes (this rank has "
                f"{description!r}); every rank must build the same metric"
            )
        self._checked_groups.add(key)

    def _wrap_update(self, update: Callable) -> Callable:
        """torchmetrics counts an update before running it; undo that when the update is rejected."""
        wrapped = super()._wrap_update(update)

        @functools.wraps(update)
        def guarded(*args: Any, **kwargs: Any) -> None:
            count, computed = self._update_count, self._computed
            try:
                wrapped(*args, **kwargs)
            except Exception:
                self._update_count, self._computed = count, computed
                raise

        return guarded


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
            raw component, is required for integer inputs, and tells feature spaces how to scale their input.
        nan_strategy: ``"error"`` (default) raises on NaN/Inf; ``"warn"`` and ``"ignore"`` skip such samples
            (counted in ``compute_summary()["skipped"]``).
        kwargs: options of the space (``component_weights=``, ``weights=``, ``layers=``, ``sample_rate=``, ...)
            and of ``torchmetrics.Metric`` (``sync_on_compute``, ``process_group``, ...).

    Example:
        >>> import torch
        >>> metric = PerceptionMSE(data_range=1.0)
        >>> metric.update(torch.full((4, 3, 8, 8), 0.5), torch.zeros(4, 3, 8, 8))
        >>> metric.compute()
        tensor(0.2500, dtype=torch.float64)
        >>> metric.compute_summary()["psnr"]
        tensor(6.0206, dtype=torch.float64)
    """

    higher_is_better = False
    is_differentiable = True
    plot_lower_bound = 0.0

    def __init__(
        self,
        space: str | nn.Module = "pixel",
        data_range: float | tuple[float, float] | None = None,
        nan_strategy: str = "error",
        **kwargs: Any,
    ) -> None:
        metric_options, space_options = split_options(kwargs, _TORCHMETRICS_OPTIONS)
        data_range = checks.check_data_range(data_range)
        nan_strategy = checks.check_choice("nan_strategy", nan_strategy, checks.NAN_STRATEGIES)
        resolved = get_space(space, **space_options)
        k = len(resolved.component_names)
        super().__init__(num_sums=k, num_counts=k + 2, **metric_options)  # counts: sizes, samples, skipped
        self.data_range, self.nan_strategy = data_range, nan_strategy
        # Held outside the module tree: never in state_dict, parameters() or an optimizer; moved by _apply.
        self.__dict__["_space"] = resolved
        self.last_batch: SampleStats | None = None

    @property
    def space(self) -> Space:
        """The perception space (frozen, eval mode, not part of the state_dict)."""
        return self.__dict__["_space"]

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Accumulate a batch; a rejected batch raises and leaves the state untouched.

        The batch's per-sample results stay available in :attr:`last_batch` (the callback ranks samples
        with them).
        """
        self._accumulate(sample_stats(preds, target, self.space, self.data_range, self.nan_strategy))

    def forward(self, preds: Tensor, target: Tensor) -> Tensor:
        """Accumulate the batch and return its Perception MSE (float64), differentiable when ``preds`` requires
        grad; the state receives the same bits as from :meth:`update`."""
        if self.dist_sync_on_step:
            return super().forward(preds, target)
        if self._is_synced:
            raise RuntimeError("PerceptionMSE: forward called while the state is synced; call unsync() first")
        stats = sample_stats(preds, target, self.space, self.data_range, self.nan_strategy)
        self._accumulate(stats)
        self._update_count += 1
        self._computed = None
        self._forward_cache = reduce_samples(stats.total(self.space.component_weights), stats.valid, "mean")
        return self._forward_cache

    def compute(self) -> Tensor:
        """Perception MSE over everything accumulated (synced across processes), a 0-dim float64 tensor."""
        return self._summary()["total"]

    def compute_components(self) -> dict[str, Tensor]:
        """Per-component MSE, ``{component: 0-dim tensor}``, synced across processes."""
        summary = self.compute_summary()
        return {name: summary[name] for name in self.space.component_names}

    def compute_summary(self) -> dict[str, Tensor]:
        """``total``, every component, ``psnr`` (with ``data_range``) and ``skipped``, with ONE sync."""
        with self.synced():
            return self._summary()

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

    def _describe(self) -> str:
        space = self.space
        checksum = math.fsum(float(t.double().sum()) for t in space.tensors())
        return (
            f"space={space.name} ({type(space).__name__}), weights={space.component_weights}, "
            f"data_range={self.data_range}, network checksum={checksum:.17g}"
        )

    def _accumulate(self, stats: SampleStats) -> None:
        sums = stats.sums.detach()
        self.last_batch = SampleStats(stats.names, sums, stats.sizes, stats.valid)
        sums = sums[stats.valid]
        kept = sums.shape[0]
        self._add(sums.T, [*(size * kept for size in stats.sizes), kept, stats.valid.numel() - kept])

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
        mse = dict(zip(names, self._sums(counts[: len(names)]), strict=True))
        total = math.fsum(weights[name] * value for name, value in mse.items() if weights[name])
        values = {"total": total if samples else math.nan, **mse, "skipped": float(skipped)}
        if self.data_range is not None:
            span = self.data_range[1] - self.data_range[0]
            raw = mse[self.space.raw_name]
            values["psnr"] = 10 * math.log10(span**2 / raw) if raw > 0 else (math.inf if raw == 0 else math.nan)
        return {key: torch.tensor(value, dtype=torch.float64, device=self.device) for key, value in values.items()}

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> nn.Module:
        """Moves the space with the metric; the space keeps its dtype (see :class:`~pl_pmse.spaces.Space`), as
        torchmetrics keeps its states' dtype. The meta device is refused before anything moves."""
        if fn(torch.zeros(())).device.type == "meta":
            raise ValueError(
                "PerceptionMSE: cannot move to the meta device (its state and space hold values); keep it on a real "
                "device (cpu, cuda, ...)"
            )
        this = super()._apply(fn, *args, **kwargs)
        this.space._apply(fn)
        return this

    def extra_repr(self) -> str:
        return f"space={self.space!r}, data_range={self.data_range}, nan_strategy={self.nan_strategy!r}"
