"""Exact, order-independent accumulation of non-negative float sums.

A float sum depends on the order of its additions, so a metric that keeps float64 sums gives a
(slightly) different number for every batch split and every world size. Here each value is cut into two
integer limbs placed in bins indexed by their binary exponent: ``value = hi * 2**(e - 27) + lo * 2**(e - 53)``
with ``hi < 2**27`` and ``lo < 2**26``. Bins are int64 and integer addition is associative, so summing
bins — across batches, in an ``all_reduce``, in any order — is exact. The float64 result is obtained once,
at the end, by Python's correctly rounded big-integer division.

Each bin takes at most one limb per value, so it cannot overflow before ``2**36`` (6.9e10) values.

Example:
    >>> import torch
    >>> sum([0.1, 0.2, 0.3])  # float addition rounds at every step
    0.6000000000000001
    >>> exact_ratio(exact_bins(torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float64))[0], 1)
    0.6
"""

from __future__ import annotations

import torch
from torch import Tensor

_HI_SHIFT = 27
_LO_BITS = 26
_MANTISSA_BITS = 53
_MIN_EXPONENT = -1073  # frexp exponent of the smallest float64 subnormal
_MAX_EXPONENT = 1024
_OFFSET = _MANTISSA_BITS - _MIN_EXPONENT  # bin 0 holds limbs worth 2**(-1126)
NUM_BINS = _MAX_EXPONENT - _HI_SHIFT + _OFFSET + 1


def exact_bins(values: Tensor) -> Tensor:
    """Bin non-negative finite values ``[K, P]`` into exact integer accumulators ``[K, NUM_BINS]``."""
    values = values.detach().to(torch.float64)
    mantissa, exponent = torch.frexp(values)
    integer = torch.ldexp(mantissa, torch.tensor(_MANTISSA_BITS, device=values.device)).to(torch.int64)
    hi = integer >> _LO_BITS
    lo = integer & ((1 << _LO_BITS) - 1)
    exponent = exponent.to(torch.int64)
    bins = torch.zeros(values.shape[0], NUM_BINS, dtype=torch.int64, device=values.device)
    bins.scatter_add_(1, exponent - _HI_SHIFT + _OFFSET, hi)
    bins.scatter_add_(1, exponent - _MANTISSA_BITS + _OFFSET, lo)
    return bins


def exact_ratio(bins: Tensor, divisor: int) -> float:
    """The correctly rounded float64 value of ``sum(bins) / divisor`` (NaN when ``divisor`` is 0)."""
    if divisor == 0:
        return float("nan")
    nonzero = bins.nonzero().flatten()
    counts = bins[nonzero].tolist()
    total = sum(count << index for index, count in zip(nonzero.tolist(), counts, strict=True))
    return total / (divisor << _OFFSET)
