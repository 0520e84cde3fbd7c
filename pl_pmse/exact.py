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
    """Add non-negative finite values ``[K, P]`` to the accumulators ``bins`` (``[K, NUM_BINS]``), in place."""
    values = values.detach()
    if values.dtype in (torch.float32, torch.float16, torch.bfloat16) and values.shape[1] > 1:
        values = _exact_row_sums(values)
    bits = values.to(torch.float64).contiguous().view(torch.int64)
    biased = bits >> _FRACTION_BITS  # the biased exponent (the sign bit is 0)
    # value = integer * 2**(max(biased, 1) - 1075), with the implicit leading bit for normal numbers
    integer = (bits & ((1 << _FRACTION_BITS) - 1)) | ((biased > 0).to(torch.int64) << _FRACTION_BITS)
    position = biased.clamp(min=1) - 1075 - _LOWEST_BIT  # value = integer * 2**(position + lowest)
    digit = torch.div(position, DIGIT_BITS, rounding_mode="floor")
    offset = position - digit * DIGIT_BITS
    low = (integer & _MASK) << offset  # < 2**60
    high = (integer >> DIGIT_BITS) << offset  # < 2**53, one digit higher
    bins.scatter_add_(1, digit, low & _MASK)
    bins.scatter_add_(1, digit + 1, (low >> DIGIT_BITS) + (high & _MASK))
    bins.scatter_add_(1, digit + 2, high >> DIGIT_BITS)
    return bins


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
