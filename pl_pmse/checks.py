"""Every input check of pl-pmse and its error message, in one place.

Checks only read their inputs; callers run them before touching any state, so a rejected call changes
nothing. Messages name the argument and say what was expected.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")
NAN_STRATEGIES = ("error", "ignore", "warn")
RESERVED_COMPONENT_NAMES = ("total", "psnr", "skipped", "ssim", "sharpness", "mcd")  # the callback's other keys


def check_choice(argument: str, value: Any, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ValueError naming ``argument``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{argument}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_sample_rate(sample_rate: Any, owner: str) -> int:
    """A sample rate in Hz: a positive integer (``owner`` needs it: "space 'mel'")."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(f"sample_rate: {owner} needs the audio's sample rate in Hz (e.g. 16000), got {sample_rate!r}")
    return sample_rate


def check_data_range(data_range: Any) -> tuple[float, float] | None:
    """Normalise ``data_range`` (None, a positive span ``d`` meaning ``[0, d]``, or ``(min, max)``)."""
    if data_range is None:
        return None
    if isinstance(data_range, Tensor) and data_range.numel() == 1:
        data_range = data_range.item()
    if isinstance(data_range, (int, float)) and not isinstance(data_range, bool):
        low, high = 0.0, float(data_range)
    elif isinstance(data_range, Sequence) and not isinstance(data_range, str) and len(data_range) == 2:
        low, high = (float(v) for v in data_range)
    else:
        raise TypeError(
            f"data_range: expected None, a positive number (values in [0, data_range]) or a (min, max) pair, "
            f"got {data_range!r}"
        )
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        raise ValueError(f"data_range: expected finite bounds with max > min, got ({low}, {high})")
    return low, high


def check_weights(weights: Mapping[str, float] | None, defaults: Mapping[str, float]) -> dict[str, float]:
    """Merge ``component_weights`` over ``defaults``; keys must be component names, values finite >= 0."""
    merged = dict(defaults)
    if weights is None:
        return merged
    if not isinstance(weights, Mapping):
        raise TypeError(
            f"component_weights: expected a mapping of component name to weight, got {type(weights).__name__}"
        )
    for name, weight in weights.items():
        if name not in merged:
            raise ValueError(f"component_weights: unknown component {name!r}; the components are {list(merged)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0 or weight == math.inf:
            raise ValueError(f"component_weights[{name!r}]: expected a finite number >= 0, got {weight!r}")
        merged[name] = float(weight)
    return merged


def check_component_names(names: Sequence[str]) -> None:
    """Component names must be unique, non-empty strings that do not clash with the summary keys."""
    for name in names:
        if not isinstance(name, str) or not name or name in RESERVED_COMPONENT_NAMES:
            raise ValueError(
                f"component name {name!r}: expected a non-empty string other than {RESERVED_COMPONENT_NAMES}"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"component names must be unique, got {list(names)}")


def check_data_range_given(space: Any, data_range: tuple[float, float] | None) -> None:
    """Spaces whose inputs commonly come in two conventions (their ``data_range_advice`` says which) need it stated."""
    advice = getattr(space, "data_range_advice", None)
    if getattr(space, "requires_data_range", False):  # the 0.1 form of saying so
        advice = advice or "its inputs come in more than one convention (requires_data_range = True)"
    if data_range is None and advice:
        raise ValueError(f"data_range: space {space.name!r} needs it stated: {advice}")


def check_batch(
    preds: Any, target: Any, data_range: tuple[float, float] | None, space: Any,
    state: tuple[str, torch.device] | None = None,
) -> None:  # fmt: skip
    """Every check of one batch, each once: the pair (:func:`check_tensor_pair`), the device of the state it goes
    into (``state``: the metric's name and device), then the space's own (:func:`check_space_input`)."""
    check_tensor_pair(preds, target, data_range)
    if state is not None:
        check_state_device(preds, *state)
    check_space_input(space, preds)


def check_space_input(space: Any, preds: Tensor) -> None:
    """The space's own checks of a batch (``space.check_input``), its ``layout_hint`` added to a shape error."""
    try:
        space.check_input(preds)
    except ValueError as error:
        hint = space.layout_hint(preds)
        if hint:
            raise ValueError(f"{error}{hint}") from None
        raise


def check_tensor_pair(preds: Any, target: Any, data_range: tuple[float, float] | None) -> None:
    """Types, dtypes, devices and shapes that every space requires."""
    for argument, value in (("preds", preds), ("target", target)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{argument}: expected a torch.Tensor, got {type(value).__name__}")
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{argument}: expected a real floating point or integer tensor, got {value.dtype}")
        if not value.is_floating_point() and data_range is None:
            raise TypeError(
                f"{argument}: integer input ({value.dtype}) needs an explicit data_range, e.g. data_range=255 "
                f"for 8-bit images or data_range=(-32768, 32767) for 16-bit audio"
            )
        if value.dtype in (torch.uint16, torch.uint32, torch.uint64):
            raise TypeError(
                f"{argument}: {value.dtype} is not supported (torch has few operations for it); convert it, e.g. "
                f"x.to(torch.int32) for uint16 or x.to(torch.int64) for uint32"
            )
        if value.dim() == 0:
            raise ValueError(f"{argument}: expected a batch [N, ...] with at least 1 dimension, got a 0-dim tensor")
    if preds.is_floating_point() != target.is_floating_point():
        raise TypeError(
            f"preds and target: expected the same dtype kind (both floating point or both integer), got "
            f"{preds.dtype} and {target.dtype}; convert one (e.g. target.float() / 255 with data_range=1.0)"
        )
    if preds.device != target.device:
        raise ValueError(f"preds and target: expected the same device, got {preds.device} and {target.device}")
    check_measuring_device(preds.device, "preds and target")
    if preds.shape != target.shape:
        raise ValueError(
            f"preds and target: expected the same shape, got {tuple(preds.shape)} and {tuple(target.shape)}"
        )
    if preds.shape[0] > 0 and preds[0].numel() == 0:
        raise ValueError(f"preds and target: every sample needs at least one element, got shape {tuple(preds.shape)}")


def check_measuring_device(device: torch.device, what: str) -> None:
    """A device that can hold a measurement: not ``meta`` (no values), not ``mps`` (no float64, in which every sum is
    taken and every state is binned). ``what`` names the argument or call, e.g. ``"PerceptionMSE.to"``."""
    if device.type == "meta":
        raise ValueError(f"{what}: the meta device holds no values to measure; use a real device (cpu, cuda, ...)")
    if device.type == "mps":
        raise ValueError(
            f"{what}: Apple's MPS device has no float64, in which pl-pmse sums squared errors and bins its exact "
            f"state; measure on the CPU (metric.cpu(), x.cpu()), a cheap move with unified memory"
        )


def check_move(what: str, *args: Any, **kwargs: Any) -> None:
    """The device of an ``nn.Module.to(*args, **kwargs)`` call, checked by :func:`check_measuring_device` before
    anything moves (``what`` names the call, e.g. ``"PerceptionMSE.to"``)."""
    device = torch._C._nn._parse_to(*args, **kwargs)[0]
    if device is not None:
        check_measuring_device(device, what)


def check_state_device(x: Tensor, metric: str, device: torch.device) -> None:
    """Inputs (already checked by :func:`check_tensor_pair`) must be where the metric's state is: a state is never
    moved behind the caller's back."""
    if x.device != device:
        raise ValueError(
            f"preds and target: are on {x.device} but the {metric} state is on {device}; move the metric to the "
            f"inputs' device (metric.to({str(x.device)!r})), as torchmetrics metrics are moved"
        )


def check_integer_range(preds: Tensor, target: Tensor, data_range: tuple[float, float] | None) -> None:
    """Integer inputs must lie inside ``data_range`` (compared as integers, exactly; a host synchronisation): a
    value outside it is a wrong ``data_range`` or corrupt data, and PSNR would be computed against a wrong peak."""
    if data_range is None or preds.is_floating_point():
        return
    for argument, value in (("preds", preds), ("target", target)):
        if value.numel():
            low, high = (int(v) for v in torch.aminmax(value))
            if low < data_range[0] or high > data_range[1]:
                raise ValueError(
                    f"{argument}: integer values in [{low}, {high}] lie outside data_range [{data_range[0]:.17g}, "
                    f"{data_range[1]:.17g}]; pass the range of the data's type, e.g. data_range=255 for uint8 or "
                    f"data_range=(-32768, 32767) for int16"
                )


def check_mask(mask: Any, preds: Tensor) -> None:
    """``mask``: a bool tensor ``[N]`` on the inputs' device, one entry per sample."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 1:
        shown = f"{mask.dtype} tensor of shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"mask: expected a bool tensor [N] saying which samples count, got a {shown}")
    if preds.dim() == 0 or mask.shape[0] != preds.shape[0] or mask.device != preds.device:
        raise ValueError(
            f"mask: expected one entry per sample ({preds.shape[0] if preds.dim() else 0}) on {preds.device}, got "
            f"{mask.shape[0]} on {mask.device}"
        )


def check_ndim(x: Tensor, allowed: Sequence[int], layout: str, space: str) -> None:
    """The batch must have one of the ``allowed`` numbers of dimensions (``layout`` describes them)."""
    if x.dim() not in allowed:
        raise ValueError(f"preds and target: space {space!r} expects {layout}, got shape {tuple(x.shape)}")


def check_min_size(x: Tensor, minimum: int, dims: str, space: str, dim: int = -1) -> None:
    """Sizes below what a space needs (too-small images, too-short audio)."""
    size = x.shape[dim]
    if size < minimum:
        raise ValueError(
            f"preds and target: space {space!r} needs {dims} of at least {minimum}, got {size} (shape {tuple(x.shape)})"
        )


def check_device(x: Tensor, tensors: list[Tensor], space: str) -> None:
    """Inputs must live where the space's network lives."""
    tensor = tensors[0] if tensors else None
    if tensor is not None and tensor.device != x.device:
        raise ValueError(
            f"preds and target: are on {x.device} but the network of space {space!r} is on {tensor.device}; "
            f"move the metric (metric.to(device)) or the space to the inputs' device"
        )


def values_outside(tensors: Sequence[Tensor], bounds: tuple[float, float]) -> tuple[float, float] | None:
    """The finite value range of ``tensors`` together when it lies more than half the span outside ``bounds`` (a
    convention mismatch: 0..255 data for [0, 1], [-1, 1] for [0, 1]), else None. A host synchronisation."""
    low, high = bounds
    slack = 0.5 * (high - low)
    ranges = [_finite_range(x.detach()) for x in tensors]
    lo, hi = min((r[0] for r in ranges), default=low), max((r[1] for r in ranges), default=high)
    return (lo, hi) if lo < low - slack or hi > high + slack else None


def _finite_range(x: Tensor) -> tuple[float, float]:
    """``(min, max)`` of the finite values (NaN/Inf are nan_strategy's business, not a range error); (inf, -inf)
    when there are none."""
    lo, hi = (float(v) for v in torch.aminmax(x))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        finite = x[torch.isfinite(x)]
        lo, hi = (float(v) for v in torch.aminmax(finite)) if finite.numel() else (math.inf, -math.inf)
    return lo, hi


def check_value_range(
    preds: Tensor, target: Tensor, bounds: tuple[float, float], space: str, data_range: Any, range_hint: str
) -> Overshoot | None:
    """Catch convention mismatches (0..255 data into a [0, 1] space, [-1, 1] into [0, 1]) on the target, and measure
    what the predictions overshoot.

    The target says which convention the data uses: more than half the span outside ``bounds`` raises (a wrong
    ``data_range``). Predictions are measured whatever their values (a model overshoots its range, at
    initialisation most of all): their overshoot, when any value lies outside ``bounds``, is returned for a warning.
    """
    found = values_outside([target], bounds)
    if found is not None:
        raise ValueError(
            f"target: space {space!r} expects values in [{bounds[0]:g}, {bounds[1]:g}] (data_range={data_range!r}), "
            f"found target values in [{found[0]:g}, {found[1]:g}]; pass the data_range your data uses, {range_hint}"
        )
    low, high = bounds
    lo, hi = _finite_range(preds.detach())  # one pass, as the target's: the fraction only when something is outside
    if low <= lo and hi <= high:
        return None
    outside = int(((preds < low) | (preds > high)).sum())
    return Overshoot(lo, hi, outside / preds.numel()) if outside else None


@dataclass(frozen=True)
class Overshoot:
    """Predictions outside the space's range: their finite extremes and the fraction of values outside."""

    low: float
    high: float
    fraction: float

    def describe(self, bounds: tuple[float, float]) -> str:
        return (
            f"{self.fraction:.2%} of the predicted values lie outside [{bounds[0]:g}, {bounds[1]:g}] (found "
            f"[{self.low:g}, {self.high:g}]): they are measured as they are"
        )


def report_nonfinite(
    preds: Tensor, target: Tensor, bad: Tensor, nan_strategy: str, component: str | None = None, raw: bool = True
) -> None:
    """Explain non-finite per-sample results: raise (``"error"``) or warn (``"warn"``) naming the argument.

    ``bad`` holds the indices of samples whose squared error is not finite. When the inputs themselves are
    finite the squared error overflowed (``raw``: the raw component) or the features are not finite: that is always
    an error.
    """
    indices = bad.tolist()
    shown = f"{indices[:8]}{' ...' if len(indices) > 8 else ''}"
    culprits = [
        argument
        for argument, value in (("preds", preds), ("target", target))
        if not bool(torch.isfinite(value[bad]).all())
    ]
    if not culprits:
        dtype = "float64" if torch.float64 in (preds.dtype, target.dtype) else "float32"
        largest = max(float(v.detach()[bad].abs().max()) for v in (preds, target))
        if not raw:
            cause = f"the space's features are not finite (|values| up to {largest:.3g}): check the inputs' scale"
        elif dtype == "float64":
            cause = f"the squared error overflows float64 (|values| up to {largest:.3g}): scale the inputs"
        else:
            cause = f"the squared error overflows float32 (|values| up to {largest:.3g}): pass float64 inputs"
        where = f"component {component!r}" if component else "the squared error"
        raise ValueError(f"preds and target: are finite but {where} is not finite for samples {shown}; {cause}")
    message = f"{' and '.join(culprits)}: contains NaN or Inf in samples {shown}"
    if nan_strategy == "error":
        raise ValueError(f"{message}; clean the inputs or pass nan_strategy='ignore' or 'warn' to skip such samples")
    if nan_strategy == "warn":
        warnings.warn(f"{message}; these samples are skipped (nan_strategy='warn')", UserWarning, stacklevel=4)
