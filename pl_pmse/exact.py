"""Exact, order-independent accumulation of non-negative float sums.

A float sum depends on the order of its additions, so a metric that keeps float sums gives a (slightly)
different number for every batch split and every world size. Here every float64 value is written exactly as
an integer in base ``2**30`` ("digits"), aligned on a fixed grid that covers the whole float64 range, and the
digits are added in int64 bins. Integer addition is associative, so summing bins — across batches, in an
``all_reduce``, in any order — is exact. The float64 result is obtained once, at the end, by Python's correctly
rounded big-integer division.

A value touches 3 consecutive bins and adds less than ``2**31`` to each, so no bin can overflow before
``2**32`` (4.3e9) values have been added. A component's state is ``NUM_BINS`` (72) int64 numbers.

Values given in float32 (or narrower) are first summed in float64 when that sum is exact (see
:func:`_exact_row_sums`): one value per row to bin instead of one per sample.

Example:
    >>> import torch
    >>> sum([0.1, 0.2, 0.3])  # float addition rounds at every step
    0.6000000000000001
    >>> exact_ratio(exact_bins(torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float64))[0], 1)
    0.6
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import torch
from torch import Tensor

DIGIT_BITS = 30
_MASK = (1 << DIGIT_BITS) - 1
_FRACTION_BITS = 52
_LOWEST_BIT = -1126  # the grid's unit is 2**-1126: the smallest subnormal, 2**-1074, is 2**52 units
NUM_BINS = (1024 - 53 - _LOWEST_BIT) // DIGIT_BITS + 3


def exact_bins(values: Tensor) -> Tensor:
    """Bin non-negative finite values ``[K, P]`` into exact integer accumulators ``[K, NUM_BINS]``."""
    bins = torch.zeros(values.shape[0], NUM_BINS, dtype=torch.int64, device=values.device)
    return add_exact(bins, values)


def add_exact(bins: Tensor, values: Tensor) -> Tensor:
    """Add non-negative finite values ``[K, P]`` to the accumulators ``bins`` (``[K, NUM_BINS]``), in place.

    A value is ``integer * 2**position`` on the grid (53-bit integer); ``position`` splits into a digit and an
    offset below 30, looked up by the biased exponent. ``integer << offset`` is written as four pieces below
    ``2**30`` on digits ``d, d+1, d+1, d+2``: one ``scatter_add_`` for the whole batch. A few values on a CPU are
    binned the same way in Python integers (a dozen tensor operations cost more than the arithmetic): the same bins.
    """
    values = values.detach()
    if values.dtype in (torch.float32, torch.float16, torch.bfloat16) and values.shape[1] > 1:
        values = _exact_row_sums(values)
    if on_host(bins.device, values.numel()):
        bins += torch.tensor(host_bins(values.to(torch.float64).tolist())).view(bins.shape)
        return bins
    bits = values.to(torch.float64).contiguous().view(torch.int64)
    layout = device_constant("binning", bins.device)[bits >> _FRACTION_BITS]  # [K, P, 3]: digit, offset, implicit bit
    integer = (bits & ((1 << _FRACTION_BITS) - 1)) | layout[..., 2]
    offset = layout[..., 1]
    halves = torch.stack([(integer & _MASK) << offset, (integer >> DIGIT_BITS) << offset], -1)  # < 2**60, < 2**53
    pieces = halves[..., None] >> device_constant("digit shifts", bins.device) & _MASK  # [K, P, 2, 2], each < 2**30
    index = layout[..., :1, None] + device_constant("value digits", bins.device, bins.shape[0])  # d, d+1 | d+1, d+2
    bins.view(-1).scatter_add_(0, index.reshape(-1), pieces.reshape(-1))
    return bins


def on_host(device: torch.device, count: int) -> bool:
    """Whether ``count`` values on ``device`` are binned in Python (:func:`host_bins`): a few, on a CPU."""
    return device.type == "cpu" and count <= 64 and not torch.compiler.is_compiling()


def host_bins(rows: list[list[float]]) -> list[int]:
    """:func:`add_exact`'s arithmetic in Python integers, value by value (the same pieces on the same digits): the
    increments of ``[K, NUM_BINS]`` bins, flattened, for the rows of non-negative finite values ``rows``."""
    added = [0] * (NUM_BINS * len(rows))
    for first, values in zip(range(0, len(added), NUM_BINS), rows, strict=True):
        for value in values:
            mantissa, exponent = math.frexp(value)  # value = mantissa * 2**exponent, 0.5 <= mantissa < 1
            if not mantissa:
                continue
            integer = int(math.ldexp(mantissa, _FRACTION_BITS + 1))  # 53 bits, exact (fewer for subnormals)
            position = exponent - _FRACTION_BITS - 1 - _LOWEST_BIT
            if position < _FRACTION_BITS:  # a subnormal: as add_exact writes it, k * 2**-1074 (exact: trailing zeros)
                integer, position = integer >> (_FRACTION_BITS - position), _FRACTION_BITS
            digit, offset = divmod(position, DIGIT_BITS)
            low, high = (integer & _MASK) << offset, (integer >> DIGIT_BITS) << offset
            added[first + digit] += low & _MASK
            added[first + digit + 1] += (low >> DIGIT_BITS) + (high & _MASK)
            added[first + digit + 2] += high >> DIGIT_BITS
    return added


def add_fixed(bins: Tensor, words: Tensor, digit: Tensor, valid: Tensor) -> Tensor:
    """Add fixed-point sums to ``bins`` (``[K, NUM_BINS]``), in place: for each sample ``i`` and row ``k``,
    ``sum_j words[i, k, j] * 2**(DIGIT_BITS * (digit[i, k] - j) + lowest)`` (``words`` ``[N, K, 3]`` int64 below
    ``2**60``, as :func:`pl_pmse.reduction.fixed_point_square_sums` gives them), for the samples ``valid`` marks.

    The words sit on the grid's digits, so each is two pieces below ``2**30``: pure integer work, one
    ``scatter_add_``, and every bin receives less than ``2**31`` per sample, as from :func:`add_exact`.
    """
    pieces = words[..., None] >> device_constant("digit shifts", bins.device) & _MASK  # [N, K, 3, 2]
    pieces = pieces * valid[:, None, None, None]
    index = digit[..., None, None] + device_constant("word digits", bins.device, words.shape[1])
    bins.view(-1).scatter_add_(0, index.reshape(-1), pieces.reshape(-1))
    return bins


def fixed_point_layout(code: int) -> tuple[float, float, int]:
    """``(scale, unit, digit)`` for squares whose largest has the biased float64 exponent ``code``: words of the
    scaled squares ``square * scale`` lie below ``2**30`` on grid digit ``digit``, and ``unit = 1 / scale`` is its
    value. ``code`` 2047 (NaN, inf) gives a NaN unit. So do squares of ``2**1004`` or more (float64 differences of
    ``2**502``, about 1.3e151, or more): their top words would pass the grid, and such a sample counts as non-finite
    on an accelerator (the CPU's float64 sum may still be finite). The scale is at most ``2**1006``, so squares below
    ``2**-976`` keep fewer than 30 bits."""
    if code >= 2027:  # 2**1004 and above: the top words would pass the grid
        return (math.nan, math.nan, 4)
    digit = max(4, -(-(code + 74) // DIGIT_BITS))  # amax < 2**(code - 1022) <= 2**30 * unit
    return (2.0 ** (-(DIGIT_BITS * digit + _LOWEST_BIT)), 2.0 ** (DIGIT_BITS * digit + _LOWEST_BIT), digit)


def device_constant(name: str | tuple, device: torch.device, rows: int = 0) -> Tensor:
    """A small constant tensor of the binning arithmetic on ``device`` (its first ``rows`` rows for the tables by
    accumulator row), made once per device (and per fake tensor mode: tensors made under one never meet real ones);
    the CPU's are made at import."""
    if torch.compiler.is_compiling():  # traced: a constant of the graph
        return _make_constant(name, max(rows, _ROWS)).to(device)[: rows or None]
    fake = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE)
    cache = _CONSTANTS if fake is None else fake.__dict__.setdefault("_pl_pmse_constants", {})  # dies with the mode
    key = (name, device)
    if key not in cache or rows > cache[key].shape[0]:
        sized = [k for k in cache if isinstance(k[0], tuple)]  # keyed by input sizes: the oldest goes
        if isinstance(name, tuple) and len(sized) >= _MAX_SIZED:
            del cache[sized[0]]
        cache[key] = _make_constant(name, max(rows, _ROWS)).to(device)
    return cache[key][: rows or None]


def _make_constant(name: str | tuple, rows: int) -> Tensor:
    if isinstance(name, tuple):  # ("count weights", sizes): a batch's counts are kept * [*sizes, 1, -1], + samples
        return torch.tensor([*name[1], 1, -1], dtype=torch.int64)
    if name == "binning":  # by biased exponent: the value's digit, its offset in it, the implicit leading bit
        rows = []
        for biased in range(2048):
            position = max(biased, 1) - 1075 - _LOWEST_BIT
            rows.append((position // DIGIT_BITS, position % DIGIT_BITS, (biased > 0) << _FRACTION_BITS))
        return torch.tensor(rows, dtype=torch.int64)
    if name == "fixed point":  # by the largest square's biased exponent: scale, unit, digit (float64)
        return torch.tensor([fixed_point_layout(code) for code in range(2048)], dtype=torch.float64)
    if name == "digit shifts":
        return torch.tensor([0, DIGIT_BITS], dtype=torch.int64)
    # by accumulator row k: its values go to digits of row k
    if name == "value digits":  # pieces on digits (d, d + 1), (d + 1, d + 2)
        return torch.tensor([[[[k * NUM_BINS + i + j for j in range(2)] for i in range(2)]] for k in range(rows)])
    assert name == "word digits", name  # word j on digits (d - j, d - j + 1)
    return torch.tensor([[[k * NUM_BINS - j + i for i in range(2)] for j in range(3)] for k in range(rows)])


_MAX_SIZED = 64  # constants kept per input sizes (count weights)
_ROWS = 64  # rows of the tables by accumulator row made at first (more when a metric needs them)
_CONSTANTS: dict[tuple, Tensor] = {}
for _name in ("binning", "fixed point", "digit shifts", "value digits", "word digits"):
    device_constant(_name, torch.device("cpu"))


def _exact_row_sums(values: Tensor) -> Tensor:
    """The float64 row sums ``[K, 1]`` of narrow floats ``[K, P]`` when every one of them is exact, else ``values``.

    Values with ``s`` significant bits whose exponents lie in ``[e_lo, e_hi]`` are multiples of ``2**(e_lo - s + 1)``
    below ``2**(e_hi + 1)``; ``P`` of them sum below ``2**(e_hi + 1 + ceil(log2 P))``, so every partial sum, in any
    order, fits float64's 53 bits when ``e_hi - e_lo <= 53 - s - ceil(log2 P)``. ``max <= min_nonzero * 2**that``
    implies it (zeros add nothing).
    """
    significant = 1 - round(math.log2(torch.finfo(values.dtype).eps))  # 24 for float32
    room = 53 - significant - math.ceil(math.log2(values.shape[1]))
    if room < 0:
        return values
    values = values.to(torch.float64)
    smallest = torch.where(values > 0, values, math.inf).amin(1)
    if bool((values.amax(1) <= smallest * 2.0**room).all()):
        return values.sum(1, keepdim=True)
    return values


def exact_sums(bins: Tensor) -> list[Fraction]:
    """The exact sum that each row of ``bins`` (``[K, NUM_BINS]``) holds, as a Fraction (for checks and tests).

    Example:
        >>> import torch
        >>> exact_sums(exact_bins(torch.tensor([[0.1, 0.2]], dtype=torch.float64))) == [Fraction(0.1) + Fraction(0.2)]
        True
    """
    return [Fraction(_integer(row, range(NUM_BINS)), 1 << -_LOWEST_BIT) for row in bins.detach().cpu().tolist()]


def exact_ratio(bins: Tensor, divisor: int) -> float:
    """The correctly rounded float64 value of ``sum(bins) / divisor`` (NaN when ``divisor`` is 0, inf past float64)."""
    return exact_ratios(bins[None], [divisor])[0]


def exact_ratios(bins: Tensor, divisors: Sequence[int]) -> list[float]:
    """:func:`exact_ratio` of each row of ``bins`` (``[K, NUM_BINS]``), reading the tensor once.

    Plain numpy on purpose: no torch intra-op parallelism, so it may run on a background thread (see
    ``PerceptionMSECallback(background_panels=True)``).
    """
    array = bins.detach().cpu().numpy()
    columns = np.flatnonzero(array.any(0)).tolist()  # the digits in use: a handful of the 72
    rows = array[:, columns].tolist()
    return [_ratio(row, columns, divisor) for row, divisor in zip(rows, divisors, strict=True)]


def _ratio(counts: list[int], columns: list[int], divisor: int) -> float:
    if divisor == 0:
        return float("nan")
    try:
        return _integer(counts, columns) / (divisor << -_LOWEST_BIT)
    except OverflowError:  # beyond the float64 range
        return float("inf")


def _integer(counts: Sequence[int], columns: Sequence[int]) -> int:
    """The sum held by the digits ``counts`` of bins ``columns``, in units of ``2**_LOWEST_BIT``."""
    return sum(count << (DIGIT_BITS * column) for count, column in zip(counts, columns, strict=True) if count)
