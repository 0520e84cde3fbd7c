"""ExactSumMetric: the base of metrics whose state is exact sums plus counts in one int64 tensor (see
:mod:`pl_pmse.exact`), synced by one ``all_reduce``; :class:`~pl_pmse.metric.PerceptionMSE` and
:class:`~pl_pmse.profile.ErrorProfile` build on it.

torchmetrics internals overridden (tested against the torchmetrics version the project pins; each listed here):

- ``_sync_dist`` (here): ONE ``all_reduce`` of the packed state instead of torchmetrics' all_gather per state, after a
  one-time configuration check across ranks.
- ``_wrap_update`` (here): torchmetrics counts an update (``_update_count``, ``_computed``) before running it; a
  rejected update restores both, so the metric is as it was.
- ``persistent`` (here): the configuration checksum, a state only so that ``MetricCollection``'s compute groups never
  merge metrics built differently, is never saved; ``_defaults`` (here) lists it first, since torchmetrics 1.6 compares
  only the first tensor state when it forms compute groups.
- ``_load_from_state_dict`` (here): a loaded state is checked (int64, no negative entry, same configuration) and
  copied, as torchmetrics would otherwise adopt the caller's tensor.
- ``_wrap_compute``, ``_apply``, ``_forward_cache``, ``_is_synced``, ``_update_count``, ``_computed``
  (:class:`~pl_pmse.metric.PerceptionMSE`): skips found on the device are reported after the synced compute; the
  space moves with the metric but keeps its dtype; ``forward`` accumulates once and caches the batch value.
"""

from __future__ import annotations

import contextlib
import functools
import json
import warnings
import weakref
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import checks
from .distributed import check_same_everywhere, differences
from .exact import NUM_BINS, add_exact, add_fixed, exact_ratios, host_bins
from .versions import require

require("torchmetrics")  # an older torchmetrics lacks internals overridden here: say so before using them
from torchmetrics import Metric  # noqa: E402
from torchmetrics.utilities.distributed import gather_all_tensors  # noqa: E402

# the keyword options of torchmetrics' Metric that ExactSumMetric's subclasses pass on (the others are their own)
TORCHMETRICS_OPTIONS = ("compute_on_cpu", "dist_sync_on_step", "process_group", "dist_sync_fn",
                        "distributed_available_fn", "sync_on_compute", "compute_with_cache")  # fmt: skip


# process group -> {id(metric): weak reference} of the metrics whose configuration was compared across its ranks.
# Keyed by the group object itself (weakly): a process group destroyed and initialised again is a new object and is
# checked again, and a process started by ddp_spawn starts with none checked. (A Metric's hash follows its state
# tensors, so metrics are found by id and confirmed by their weak reference.)
_CHECKED: weakref.WeakKeyDictionary[Any, dict[int, weakref.ref]] = weakref.WeakKeyDictionary()


def _dead() -> None:
    return None


def _process_group(group: Any) -> Any:
    """The process group object ``group`` names (None: the default one), or None outside torch.distributed."""
    if group is not None:
        return group
    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


@dataclass
class Padding:
    """One rank's pass over a ``DistributedSampler``: how many of its samples are the dataset's own (``None``: not
    known), how many came before the current batch, and how many of the batch the metrics have taken so far."""

    own: int | None
    seen: int = 0
    rows: int = 0


class ExactSumMetric(Metric):
    """Base of metrics whose state is exact sums of non-negative values plus integer counts, in ONE tensor.

    Subclasses call :meth:`_add` in ``update`` and read :meth:`_sums` / :meth:`_counts` in ``compute``; syncing
    is one ``all_reduce`` of the int64 state (see :mod:`pl_pmse.exact`), preceded once per process group by a
    check that every rank built the same configuration (:meth:`configuration`). A state carries its configuration:
    ``state_dict`` saves it, and ``load_state_dict`` / ``merge_state`` refuse a state of another configuration.
    """

    full_state_update = False
    totals: Tensor

    def __init__(self, num_sums: int, num_counts: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._num_sums, self._num_counts = num_sums, num_counts
        self._result_dtype = torch.get_default_dtype()  # as torchmetrics' metrics return; set_dtype changes it
        self.add_state("totals", torch.zeros(num_sums * NUM_BINS + num_counts, dtype=torch.int64), "sum")

    def _add_configuration_checksum(self) -> None:
        """A second, constant state: a checksum of :meth:`configuration` (subclasses call this at the end of their
        ``__init__``). torchmetrics' ``MetricCollection`` puts metrics whose states are equal after the first update
        into one compute group and updates only its first member; with the checksum only metrics built alike share,
        so a strict and a lenient metric (``nan_strategy``) or two spaces never do. Never saved, never summed."""
        text = json.dumps(self.configuration(), sort_keys=True).encode()
        checksum = torch.tensor([zlib.crc32(text), zlib.adler32(text)], dtype=torch.int64)
        self.add_state("configuration_checksum", checksum, dist_reduce_fx="max", persistent=False)
        # first among the states: torchmetrics 1.6's _equal_metric_states decides on the first tensor state alone
        self._defaults = {"configuration_checksum": self._defaults.pop("configuration_checksum"), **self._defaults}

    def persistent(self, mode: bool = False) -> None:
        """torchmetrics' ``persistent`` for the exact state; the configuration checksum is never saved (a saved state
        carries its whole configuration instead, see :meth:`state_dict`)."""
        super().persistent(mode)
        self._persistent["configuration_checksum"] = False

    def set_dtype(self, dst_type: Any) -> ExactSumMetric:
        """The dtype of the results: torch's default (float32) unless set, as torchmetrics' metrics return;
        ``torch.float64`` gives the exact value rounded to float64. The exact state is not changed (it stays int64);
        every dtype gives the same number on every machine and split.

        Example:
            >>> import torch
            >>> from pl_pmse import PerceptionMSE
            >>> metric = PerceptionMSE().set_dtype(torch.float64)
            >>> metric.update(torch.full((1, 3), 0.1), torch.zeros(1, 3))
            >>> metric.compute()
            tensor(0.0100, dtype=torch.float64)
        """
        if not isinstance(dst_type, torch.dtype) or not dst_type.is_floating_point:
            raise TypeError(f"dst_type: expected a floating point torch.dtype, got {dst_type!r}")
        self._result_dtype, self._computed = dst_type, None
        return self

    def to(self, *args: Any, **kwargs: Any) -> ExactSumMetric:
        """``nn.Module.to``; the device is checked from the arguments first, so that a device this torch cannot
        reach (MPS off a Mac) gets the reason it cannot measure there rather than torch's own error."""
        checks.check_move(f"{type(self).__name__}.to", *args, **kwargs)
        return super().to(*args, **kwargs)

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> ExactSumMetric:
        """Every move and cast of ``nn.Module`` (``.to``, ``.cuda``, a parent's ``.to`` or ``.half``) comes here: a
        device that cannot hold the measurement (meta, MPS) is refused before anything moves."""
        checks.check_measuring_device(fn(torch.zeros(())).device, f"{type(self).__name__}.to")
        return super()._apply(fn, *args, **kwargs)

    def configuration(self) -> dict[str, str]:
        """Every setting that decides what the state means, as text: compared across ranks before the first sync,
        saved with the state and checked when a state is loaded or merged."""
        return {"metric": type(self).__name__, "state size": str(self.totals.numel())}

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """torchmetrics' ``state_dict``; a persistent state (``metric.persistent(True)``) comes with its
        ``configuration``, checked when the state is loaded."""
        destination = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        if self._persistent["totals"]:
            destination[prefix + "configuration"] = self.configuration()
        return destination

    def _refuse_other_configuration(self, what: str, other: Mapping[str, str] | None, size: int | None) -> None:
        """Raise naming the settings in which ``other`` (a configuration, when known) and this metric differ."""
        mine = self.configuration()
        found = differences({"this metric": mine, "the other state": other}) if other is not None else ""
        if not found and size is not None and size != self.totals.numel():
            found = f"state size is {self.totals.numel()} (this metric), {size} (the other state)"
        if found:
            raise ValueError(
                f"{type(self).__name__}.{what}: the state comes from another configuration ({found}); build "
                f"the metric as the state was built"
            )

    def _refuse_untrusted_state(self, what: str, totals: Any) -> None:
        """Raise unless ``totals`` is a state this metric could have written: a 1-D int64 tensor with no negative
        entry (the bins and counts are sums of non-negative integers). A float state would round, and a negative
        entry comes from tampering or an overflow; either gives a wrong number later, so neither is taken."""
        if not isinstance(totals, Tensor):
            raise TypeError(f"{type(self).__name__}.{what}: expected the state 'totals' as a tensor, got {totals!r}")
        if totals.dtype != torch.int64 or totals.dim() != 1:
            raise ValueError(
                f"{type(self).__name__}.{what}: the state 'totals' must be a 1-D int64 tensor of exact integer "
                f"accumulators, got a {totals.dtype} tensor of shape {tuple(totals.shape)}"
            )
        if totals.numel() == self.totals.numel() and bool((totals < 0).any()):
            raise ValueError(
                f"{type(self).__name__}.{what}: the state 'totals' has negative entries at "
                f"{(totals < 0).nonzero().flatten().tolist()[:8]}; exact sums and counts are never negative (the "
                f"state was altered or overflowed)"
            )

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        saved, totals = state_dict.get(prefix + "configuration"), state_dict.get(prefix + "totals")
        if saved is not None and not (isinstance(saved, Mapping) and all(isinstance(k, str) for k in saved)):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the saved 'configuration' must be the dict of settings "
                f"state_dict() wrote, got {saved!r:.80}"
            )
        if totals is not None:  # a state saved before 0.2 has no configuration: its size is checked
            self._refuse_untrusted_state("load_state_dict", totals)
            self._refuse_other_configuration("load_state_dict", saved, totals.numel())
        state_dict = {key: value for key, value in state_dict.items() if key != prefix + "configuration"}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.totals = self.totals.clone()  # torchmetrics adopts the given tensor; updates write into the state

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """Add another metric's state (or a ``metric_state`` dict) of the same configuration to this one."""
        if incoming_state is self:
            raise ValueError(
                f"{type(self).__name__}.merge_state: a metric merged with itself would count its samples twice; "
                f"merge a copy (copy.deepcopy(metric)) if that is what you mean"
            )
        incoming = incoming_state.totals if isinstance(incoming_state, ExactSumMetric) else None
        if isinstance(incoming_state, Mapping):
            incoming = incoming_state.get("totals")
        if isinstance(incoming, Tensor) and incoming.shape == self.totals.shape and incoming.dtype == torch.int64:
            room = torch.iinfo(torch.int64).max - self.totals  # the sum of two legitimate states stays far below
            if bool((incoming.to(self.totals.device) > room).any()):
                raise ValueError(
                    f"{type(self).__name__}.merge_state: the sum would overflow the int64 accumulators (entries "
                    f"near 2**63: states that no run of updates writes); nothing was merged"
                )
        if isinstance(incoming_state, ExactSumMetric):
            self._refuse_untrusted_state("merge_state", incoming_state.totals)
            self._refuse_other_configuration("merge_state", incoming_state.configuration(), None)
        elif isinstance(incoming_state, Mapping) and "totals" in incoming_state:
            self._refuse_untrusted_state("merge_state", incoming_state["totals"])
            self._refuse_other_configuration("merge_state", None, incoming_state["totals"].numel())
            checksum = incoming_state.get("configuration_checksum")  # metric_state carries it: compare, never mix
            if checksum is not None and not torch.equal(
                torch.as_tensor(checksum).cpu(), self.configuration_checksum.cpu()
            ):
                raise ValueError(
                    f"{type(self).__name__}.merge_state: the state comes from another configuration (its "
                    f"configuration checksum differs: another space, data_range or option); merge states of metrics "
                    f"built alike"
                )
            incoming_state = {**incoming_state, "configuration_checksum": self.configuration_checksum}
        super().merge_state(incoming_state)

    def _add(
        self,
        sums: Tensor | list[list[float]] | None,
        counts: Sequence[int] | Tensor,
        fixed: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> None:
        """Add ``sums`` (``[num_sums, P]``, non-negative, finite: a tensor, or rows of Python floats with ``counts``
        as ints) or ``fixed`` (``(words, digit, valid)``: fixed-point sums of every row, see
        :func:`~pl_pmse.exact.add_fixed`), and ``counts`` (ints, or an int64 tensor on the state's device: no host
        synchronisation) to the state."""
        totals = self.totals
        if totals.is_inference() and not torch.is_inference_mode_enabled():
            totals = self.totals = totals.clone()  # reset in validation: an inference tensor changes in inference mode
        if isinstance(sums, list):  # rows of Python floats: binned in Python, one addition for all
            totals += torch.tensor(host_bins(sums) + list(counts))
            return
        bins = totals[: self._num_sums * NUM_BINS].view(self._num_sums, NUM_BINS)
        if fixed is not None:
            add_fixed(bins, *(x.to(totals.device) for x in fixed))
        if sums is not None:
            add_exact(bins, sums.to(totals.device))
        if not isinstance(counts, Tensor):
            counts = torch.tensor(counts, dtype=torch.int64)
        totals[self._num_sums * NUM_BINS :].add_(counts.to(totals.device))

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

        A state of another size on some rank would crash gloo or hang NCCL inside the all_reduce, and another
        configuration of the same size would sum unlike numbers; :func:`~pl_pmse.distributed.check_same_everywhere`
        (a hash of :meth:`configuration`, which includes the state size) turns both into a clear error on every rank.
        """
        resolved = _process_group(group)
        checked = _CHECKED.get(resolved, {}) if resolved is not None else {}
        if checked.get(id(self), _dead)() is not self:
            state = {"state dtype": str(self.totals.dtype)}  # a float state on one rank raises on every rank
            check_same_everywhere({**self.configuration(), **state}, type(self).__name__, group, self.totals.device)
            self.configuration_checked(group)

    def configuration_checked(self, group: Any = None) -> None:
        """Record that :meth:`configuration` was compared across the ranks of ``group`` by the caller (the
        callback checks its metrics with its own options, once per fit), so the first sync skips its own check."""
        resolved = _process_group(group or self.process_group)
        if resolved is not None:
            _CHECKED.setdefault(resolved, {})[id(self)] = weakref.ref(self)

    def padding_left_out_by_caller(self) -> ExactSumMetric:
        """Say that whoever updates this metric leaves the ``DistributedSampler``'s padding out itself (slices it off
        or passes ``mask=``): no warning under ``torch.distributed`` then. Returns the metric."""
        self.__dict__["_padding_warned"] = True
        return self

    @contextlib.contextmanager
    def _padded(self, preds: Any, mask: Tensor | None) -> Iterator[Tensor | None]:
        """:meth:`_padding_mask` of the batch ``preds`` (not checked yet: anything but a batch tensor has no rows) for
        an update that may still refuse it: the padding bookkeeping it advanced goes back if the block raises, so a
        rejected batch leaves it as it was."""
        rows = preds.shape[0] if isinstance(preds, Tensor) and preds.dim() else 0
        padding = self.__dict__.get("_padding")
        saved = (self.__dict__.get("_padding_rows"), padding.rows if padding is not None else None)
        try:
            yield self._padding_mask(rows, mask, preds.device if rows else None)
        except BaseException:
            if padding is not None:
                self.__dict__["_padding_rows"], padding.rows = saved
            raise

    def _padding_mask(self, rows: int, mask: Tensor | None, device: torch.device | None) -> Tensor | None:
        """The mask of an update of ``rows`` samples: the caller's; else, in a pass that
        :class:`~pl_pmse.callback.ExactEvaluation` follows, False for the ``DistributedSampler``'s padding repeats
        (None when there are none in this batch); else None, with one warning under ``torch.distributed`` that the
        repeats are counted."""
        padding = self.__dict__.get("_padding")
        if mask is not None or rows == 0:
            return mask
        if padding is not None:
            taken = self.__dict__.get("_padding_rows", 0)  # of this batch, by earlier updates of this metric
            start, self.__dict__["_padding_rows"] = padding.seen + taken, taken + rows
            padding.rows = max(padding.rows, taken + rows)
            counted = rows if padding.own is None else max(0, min(rows, padding.own - start))
            return None if counted == rows else torch.arange(rows, device=device) < counted
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1
        if distributed and not self.__dict__.get("_padding_warned"):
            self.__dict__["_padding_warned"] = True
            warnings.warn(
                f"{type(self).__name__}: under torch.distributed, update() counts every sample each rank receives: "
                f"a DistributedSampler pads the ranks to equal length with repeats of the first samples (when the "
                f"set size is not a multiple of the world size), so the value is not the one-process value. In "
                f"Lightning add pl_pmse.ExactEvaluation() to the Trainer's callbacks (validation and test updates); "
                f"elsewhere pass "
                f"update(..., mask=pl_pmse.distributed.sample_mask(sampler, start, len(preds)))",
                UserWarning,
                stacklevel=5,  # the caller of update(): through torchmetrics' and our update wrappers
            )
        return None

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


class SampleFiguresMetric(ExactSumMetric):
    """Base of the exact metrics of per-sample figures beside Perception MSE (:class:`~pl_pmse.fidelity.ImageFidelity`,
    :class:`~pl_pmse.mcd.MelCepstralDistortion`): :meth:`sample_values` measures a batch (no checks, no gradients),
    :meth:`rows` turns the values into the state's non-negative sums ``[num_sums, N]``, and the samples whose values
    are all finite are added and counted (one count)."""

    figures: tuple[str, ...] = ()

    def __init__(self, num_sums: int, nan_strategy: str = "error", **options: Any) -> None:
        nan_strategy = checks.check_choice("nan_strategy", nan_strategy, checks.NAN_STRATEGIES)
        super().__init__(num_sums=num_sums, num_counts=2, **options)  # counts: the samples measured, and skipped
        self.nan_strategy = nan_strategy

    def configuration(self) -> dict[str, str]:
        return {**super().configuration(), "nan_strategy": repr(self.nan_strategy)}

    def compute_skipped(self) -> Tensor:
        """How many samples were left out for NaN or Inf values (synced across processes), as a 0-dim int64 tensor.

        Example:
            >>> from pl_pmse import ImageFidelity
            >>> fidelity = ImageFidelity(nan_strategy="ignore")
            >>> images = torch.rand(2, 3, 16, 16)
            >>> fidelity.update(images.clone().index_fill_(0, torch.tensor([0]), float("nan")), images)
            >>> fidelity.compute_skipped()
            tensor(1)
        """
        with self.synced():
            skipped = self._counts()[1]
        return torch.tensor(skipped, device=self.device)

    def check(self, preds: Tensor, target: Tensor) -> None:
        """Raise on a pair that cannot be measured, naming what was expected."""
        raise NotImplementedError

    def sample_values(self, preds: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Each sample's values, float64 ``[N]`` by name."""
        raise NotImplementedError

    def rows(self, values: Mapping[str, Tensor]) -> Tensor:
        """The sums ``[num_sums, N]`` of :meth:`sample_values`' values."""
        raise NotImplementedError

    def update(self, preds: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        """Accumulate a batch; samples with NaN/Inf follow ``nan_strategy`` (``"error"`` raises naming them and adds
        nothing, ``"warn"`` / ``"ignore"`` leave them out and count them: :meth:`compute_skipped`), and those ``mask``
        (bool ``[N]``) leaves out (as in :meth:`PerceptionMSE.update <pl_pmse.PerceptionMSE.update>`)."""
        self.check(preds, target)
        checks.check_state_device(preds, type(self).__name__, self.totals.device)
        with self._padded(preds, mask) as mask:
            if mask is not None:
                checks.check_mask(mask, preds)
                preds, target = preds[mask], target[mask]
            if preds.shape[0]:
                values = self.sample_values(preds, target)
                if self.nan_strategy != "ignore":  # a host read: "ignore" counts them on the device
                    bad = (~self.rows(values).isfinite().all(0)).nonzero().flatten()
                    if bad.numel():
                        checks.report_nonfinite(preds, target, bad, self.nan_strategy, "/".join(self.figures), False)
                self._accumulate(values)

    def accumulate(self, values: Mapping[str, Tensor]) -> None:
        """Add the samples of :meth:`sample_values` (those with a non-finite value are left out): the same state as
        :meth:`update` of the same samples."""
        if self._is_synced:
            raise RuntimeError(f"{type(self).__name__}: accumulate called while the state is synced; call unsync()")
        self._accumulate(values)
        self._update_count += 1
        self._computed = None

    def _accumulate(self, values: Mapping[str, Tensor]) -> None:
        rows = self.rows(values)
        finite = rows.isfinite().all(0)  # no data-dependent shape: no host synchronisation on an accelerator
        self._add(torch.where(finite, rows, 0.0), torch.stack([finite.sum(), (~finite).sum()]))
