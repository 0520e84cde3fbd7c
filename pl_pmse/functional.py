"""Functional Perception MSE: pure, differentiable, per-sample and per-component."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import checks
from .precision import own_precision
from .reduction import compute_dtype, integer_squared_error_parts, square_sums
from .spaces import Space, get_space


@dataclass(frozen=True)
class SampleStats:
    """Per-sample squared-error sums of one batch, one column per component.

    Attributes:
        names: component names, the raw component first.
        sums: ``[N, K]`` float64 sums of squared differences; rows of samples skipped by a host-side check are NaN
            (under ``validate_args=False`` skipped samples keep their values and are marked in ``valid``).
        sizes: elements per sample of each component (the MSE divisors).
        valid: ``[N]`` bool, False for samples skipped under ``nan_strategy="ignore"`` or ``"warn"``.
        raw_parts: for integer inputs, ``[N, R]`` exact non-negative float64 values whose exact sum is the raw
            component's squared-error sum (``sums[:, 0]`` is their sum in float64); None for float inputs.
        words, digit: on accelerators, for a space of exact features and float inputs, the sums as fixed-point
            integers (``[N, K, 3]``, ``[N, K]``; see :func:`pl_pmse.exact.add_fixed`), ``sums`` their float64 values.
    """

    names: tuple[str, ...]
    sums: Tensor
    sizes: tuple[int, ...]
    valid: Tensor
    raw_parts: Tensor | None = None
    words: Tensor | None = None
    digit: Tensor | None = None

    def mse(self) -> Tensor:
        """``[N, K]`` per-sample, per-component mean squared error."""
        return torch.stack([self.sums[:, k] / size for k, size in enumerate(self.sizes)], 1)  # no host-to-device copy

    def total(self, weights: Mapping[str, float]) -> Tensor:
        """``[N]`` per-sample Perception MSE: the weighted sum of the component MSEs."""
        mse = self.mse()
        return sum(weights[name] * mse[:, k] for k, name in enumerate(self.names))


def sample_stats(
    preds: Tensor,
    target: Tensor,
    space: Space,
    data_range: tuple[float, float] | None = None,
    nan_strategy: str = "error",
    validate_args: bool = True,
) -> SampleStats:
    """Check the inputs and compute per-sample squared-error sums in every component of ``space``.

    Samples with NaN/Inf are handled per ``nan_strategy``: ``"error"`` raises, ``"warn"`` warns and skips
    them, ``"ignore"`` skips them. Gradients flow when autograd records and an input requires grad.

    ``validate_args=False`` makes no host synchronisation: the value range is not checked; under ``"error"``
    non-finite values are not looked for (they reach the sums), under ``"warn"`` and ``"ignore"`` samples with
    non-finite inputs are skipped on the device, without a warning. Types, shapes and devices are always checked.
    """
    checks.check_choice("nan_strategy", nan_strategy, checks.NAN_STRATEGIES)
    checks.check_data_range_given(space, data_range)
    checks.check_batch(preds, target, data_range, space)
    return measure(preds, target, space, data_range, nan_strategy, validate_args)


def measure(
    preds: Tensor,
    target: Tensor,
    space: Space,
    data_range: tuple[float, float] | None,
    nan_strategy: str,
    validate_args: bool = True,
) -> SampleStats:
    """:func:`sample_stats` of a batch that passed :func:`~pl_pmse.checks.check_batch` (each input is checked once
    per call: the metric checks its options at construction and the batch in ``batch_stats``)."""
    n = preds.shape[0]
    if n == 0:
        empty = torch.zeros(0, len(space.component_names), dtype=torch.float64, device=preds.device)
        return SampleStats(space.component_names, empty, (0,) * len(space.component_names), empty[:, 0] > 0)
    if not validate_args:
        return _unchecked_stats(space, preds, target, data_range, nan_strategy)
    checks.check_integer_range(preds, target, data_range)
    stats = _component_sums(space, preds, target, data_range)
    if not bool(stats.valid.all()):
        sums = _drop_nonfinite(space, preds, target, data_range, nan_strategy, stats.sums, stats.valid)
        stats = dataclasses.replace(stats, sums=sums)
    return stats


def _unchecked_stats(
    space: Space, preds: Tensor, target: Tensor, data_range: tuple[float, float] | None, nan_strategy: str
) -> SampleStats:
    """:func:`sample_stats` with device-side operations only (``validate_args=False``)."""
    if nan_strategy == "error":  # NaN/Inf are not looked for: they reach the sums
        stats = _component_sums(space, preds, target, data_range, validate_args=False)
        return dataclasses.replace(stats, valid=torch.ones_like(stats.valid))
    finite = None
    if torch.is_grad_enabled() and (preds.requires_grad or target.requires_grad):
        # skipped samples are computed on zeros, so that nothing non-finite reaches the gradient
        finite = _finite_samples(preds) & _finite_samples(target)
        preds, target = (torch.where(_per_sample(finite, x), x, 0) for x in (preds, target))
    stats = _component_sums(space, preds, target, data_range, validate_args=False)
    return stats if finite is None else dataclasses.replace(stats, valid=stats.valid & finite)  # else: on the sums


def _finite_samples(x: Tensor) -> Tensor:
    """``[N]`` bool: the samples of ``x`` whose values are all finite."""
    return torch.isfinite(x).reshape(x.shape[0], -1).all(1) if x.is_floating_point() else x.new_ones(x.shape[0]) > 0


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """``[N]`` values shaped to broadcast against ``like`` (``[N, ...]``)."""
    return values.view(-1, *(1,) * (like.dim() - 1))


def _component_sums(
    space: Space,
    preds: Tensor,
    target: Tensor,
    data_range: tuple[float, float] | None,
    validate_args: bool = True,
) -> SampleStats:
    """The per-sample squared-error sums of every component, in the space's own precision (see
    :mod:`pl_pmse.precision`); ``valid`` marks the samples whose sums are all finite (device-side)."""
    with own_precision(preds.device, inner_products=not space.exact_features):
        pairs = space.pairs(preds, target, data_range, validate_args)
        if tuple(pairs) != space.component_names:
            raise RuntimeError(f"space {space.name!r} returned {list(pairs)}, expected {list(space.component_names)}")
        raw_parts = None if preds.is_floating_point() else integer_squared_error_parts(preds, target)
        floats = list(pairs.values())[raw_parts is not None :]  # the raw pair comes first
        computed = square_sums(floats, space.exact_features) if floats else None
    columns = [raw_parts.sum(1, keepdim=True)] if raw_parts is not None else []
    columns += [computed.values] if computed is not None else []
    sums = torch.cat(columns, 1) if len(columns) > 1 else columns[0]
    valid = (sums.detach() < math.inf).all(1)  # NaN compares False
    sizes = tuple(p[0].numel() for p, _ in pairs.values())
    if raw_parts is not None or computed is None:  # integer inputs: the state takes the exact parts and the values
        return SampleStats(space.component_names, sums, sizes, valid, raw_parts)
    return SampleStats(space.component_names, sums, sizes, valid, None, computed.words, computed.digit)


def _drop_nonfinite(
    space: Space,
    preds: Tensor,
    target: Tensor,
    data_range: tuple[float, float] | None,
    nan_strategy: str,
    sums: Tensor,
    valid: Tensor,
) -> Tensor:
    """Report samples whose squared error is not finite, then blank their rows with NaN.

    Under autograd the kept samples are recomputed without the bad ones so that no NaN reaches a gradient.
    """
    bad = (~valid).nonzero().flatten()
    column = int((~torch.isfinite(sums[bad].detach())).any(0).nonzero()[0])
    name = space.component_names[column]
    if name != space.raw_name:  # features not finite: the weights themselves, before blaming the inputs' scale
        tensors = space.tensors()
        broken = sum(1 for t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all()))
        if broken:
            raise ValueError(
                f"space {space.name!r}: {broken} of its {len(tensors)} weight tensors hold NaN or Inf, so its "
                f"features cannot be finite (component {name!r}); load or re-initialise the weights"
            )
    checks.report_nonfinite(preds, target, bad, nan_strategy, name, raw=name == space.raw_name)
    keep = valid.nonzero().flatten()
    kept = sums[keep]
    if sums.requires_grad and keep.numel():
        kept = _component_sums(space, preds[keep], target[keep], data_range).sums
    return torch.full_like(sums.detach(), math.nan).index_put((keep,), kept)


def reduce_samples(values: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """Reduce per-sample ``values`` over the valid samples: ``"mean"``, ``"sum"`` or ``"none"`` (device-side:
    no host synchronisation; the mean of no sample is NaN)."""
    if reduction == "none":
        return torch.where(_per_sample(valid, values), values, math.nan)
    total = torch.where(_per_sample(valid, values), values, 0).sum(0)
    return total if reduction == "sum" else total / valid.sum()


def perception_mse(
    preds: Tensor,
    target: Tensor,
    space: str | nn.Module = "pixel",
    reduction: str = "mean",
    data_range: float | tuple[float, float] | None = None,
    nan_strategy: str = "error",
    validate_args: bool = True,
    **space_options: Any,
) -> Tensor:
    """Perception MSE between ``preds`` and ``target``: ``sum_c w_c * mean((phi_c(preds) - phi_c(target))**2)``.

    Differentiable, so it serves as a training loss. For a network space, build the space once and pass it
    (``space=get_space("vgg16", weights=...).to(device)``); names are resolved through a small cache.

    Args:
        preds: predictions ``[N, ...]`` (images ``[N, C, H, W]``, audio ``[N, T]`` or ``[N, C, T]``).
        target: ground truth, same shape, dtype kind and device as ``preds``.
        space: a space name (see :func:`pl_pmse.spaces.available_spaces`), a Space or an ``nn.Module``.
        reduction: ``"mean"`` over samples, ``"sum"`` over samples, or ``"none"`` (one value per sample, ``[N]``).
        data_range: value range of the inputs, ``d`` for ``[0, d]`` or ``(min, max)``; required for integer
            inputs; feature spaces map it onto the range their network expects.
        nan_strategy: ``"error"`` (default), ``"warn"`` or ``"ignore"`` samples containing NaN/Inf; skipped
            samples are NaN under ``reduction="none"`` and left out of ``"mean"`` and ``"sum"``.
        validate_args: ``False`` for a training loss: no host synchronisation per call, so the GPU never waits
            and ``torch.compile(..., fullgraph=True)`` traces it. The value range is then not checked, NaN/Inf is
            not looked for under ``nan_strategy="error"`` (a NaN input gives a NaN loss), and under ``"warn"`` /
            ``"ignore"`` samples with NaN/Inf inputs are skipped on the device without a warning. Types, shapes
            and devices are always checked.
        space_options: options of a named space (e.g. ``weights=``, ``layers=``, ``sample_rate=``).

    Returns:
        float32 (float64 for float64 inputs): a scalar, or ``[N]`` for ``reduction="none"``.

    Example:
        >>> import torch
        >>> preds, target = torch.full((2, 3, 8, 8), 0.5), torch.zeros(2, 3, 8, 8)
        >>> perception_mse(preds, target)
        tensor(0.2500)
        >>> perception_mse(preds, target, reduction="none")
        tensor([0.2500, 0.2500])
    """
    space, stats = _stats(preds, target, space, reduction, data_range, nan_strategy, validate_args, space_options)
    total = reduce_samples(stats.total(space.component_weights), stats.valid, reduction)
    return total.to(compute_dtype(preds, target))


def perception_mse_components(
    preds: Tensor,
    target: Tensor,
    space: str | nn.Module = "pixel",
    reduction: str = "mean",
    data_range: float | tuple[float, float] | None = None,
    nan_strategy: str = "error",
    validate_args: bool = True,
    **space_options: Any,
) -> dict[str, Tensor]:
    """Per-component MSE, ``{component: value}``; arguments as in :func:`perception_mse`.

    Example:
        >>> import torch
        >>> perception_mse_components(torch.ones(2, 4), torch.zeros(2, 4), reduction="none")
        {'pixel': tensor([1., 1.])}
    """
    _, stats = _stats(preds, target, space, reduction, data_range, nan_strategy, validate_args, space_options)
    mse = reduce_samples(stats.mse(), stats.valid, reduction).to(compute_dtype(preds, target))
    return {name: mse[..., k] for k, name in enumerate(stats.names)}


def _stats(
    preds: Tensor,
    target: Tensor,
    space: str | nn.Module,
    reduction: str,
    data_range: Any,
    nan_strategy: str,
    validate_args: bool,
    options: dict[str, Any],
) -> tuple[Space, SampleStats]:
    checks.check_choice("reduction", reduction, checks.REDUCTIONS)
    checks.check_choice("nan_strategy", nan_strategy, checks.NAN_STRATEGIES)
    bounds = checks.check_data_range(data_range)
    checks.check_tensor_pair(preds, target, bounds)  # before a network is built (or downloaded)
    resolved = _resolve_space(space, options, preds.device)
    checks.check_data_range_given(resolved, bounds)
    checks.check_space_input(resolved, preds)
    return resolved, measure(preds, target, resolved, bounds, nan_strategy, validate_args)


def _resolve_space(space: str | nn.Module, options: dict[str, Any], device: torch.device | None) -> Space:
    """Named spaces are built once per (name, options, device) and kept in a small LRU cache, shared by threads
    under a lock (a space's own captures are thread-safe)."""
    if not isinstance(space, str):
        return get_space(space, **options)
    try:
        key = (space, _hashable(options), device)
        hash(key)
    except TypeError:  # unhashable options: build every call
        key = None
    lock = contextlib.nullcontext() if torch.compiler.is_compiling() else _SPACE_CACHE_LOCK  # traced: no lock
    with lock:
        cached = _SPACE_CACHE.get(key) if key is not None else None
    if cached is None:  # built outside the lock (a download may take long); two threads may both build it
        with torch.inference_mode(False):  # weights built in validation must still serve a training loss
            cached = get_space(space, **options).to(device)
    if key is None:
        return cached
    with lock:
        cached = _SPACE_CACHE.pop(key, cached)  # the first one stored wins: every thread measures with one space
        _SPACE_CACHE[key] = cached
        while len(_SPACE_CACHE) > _SPACE_CACHE_SIZE:
            _SPACE_CACHE.popitem(last=False)
    return cached


_SPACE_CACHE: OrderedDict[tuple, Space] = OrderedDict()
_SPACE_CACHE_SIZE = 8
_SPACE_CACHE_LOCK = threading.Lock()


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value
