"""Per-sample sums of squared differences: a differentiable path and a fast streaming path.

The fast path (no autograd) never builds a full-size ``preds - target`` for the batch: it walks the
batch in blocks of about ``BLOCK_ELEMENTS`` elements, subtracts, and takes per-chunk dot products
(``CHUNK`` elements each, float32 for inputs of 32 bits or fewer, float64 for float64 input), which are then
added per sample in float64. A sample's value depends only on that sample, never on the rest of the batch,
so any batch split gives bit-identical per-sample values.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

BLOCK_ELEMENTS = 1 << 19
CHUNK = 2048
MAX_ROWS = 1024  # bounds the padding work for tiny samples


def squared_error_sums(preds: Tensor, target: Tensor | None = None) -> Tensor:
    """Sum of ``(preds - target) ** 2`` over all but the first dimension, one float64 value per sample
    (``target=None``: the sum of ``preds ** 2``, for a difference computed already).

    The value always comes from the streaming path, so it is the same bits with or without autograd. Under autograd
    the inputs themselves are saved for backward (no full-size temporary), and the gradient is the plain formula's,
    ``2 * (preds - target) * grad`` in the inputs' float dtype (at least float32). Integer inputs are summed exactly
    (:func:`integer_squared_error_parts`; the metric's state receives those exact parts), their sum here in float64.
    Under ``torch.compile`` the plain formula gives the value too (equal to float32 rounding; the compiler fuses it
    into one pass).

    Example:
        >>> p, t = torch.ones(2, 3), torch.zeros(2, 3)
        >>> squared_error_sums(p, t)
        tensor([3., 3.], dtype=torch.float64)
    """
    if not preds.is_floating_point():
        return integer_squared_error_parts(preds, target).sum(1)
    if torch.compiler.is_compiling():
        return _difference(preds, target).square().reshape(preds.shape[0], -1).sum(1).to(torch.float64)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (preds, target)):
        return _SquaredErrorSums.apply(preds, target)
    return _streaming_sums(*_memory_order(preds, target))


class _SquaredErrorSums(torch.autograd.Function):
    """The streaming sums with the plain formula's gradient; saves the inputs (views, no copy)."""

    @staticmethod
    def forward(preds: Tensor, target: Tensor | None) -> Tensor:
        return _streaming_sums(*_memory_order(preds, target))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor | None], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        preds, target = ctx.saved_tensors
        preds_wanted, target_wanted = ctx.needs_input_grad
        difference = _difference(preds, target)
        scale = (2 * grad.to(difference.dtype)).view(-1, *(1,) * (preds.dim() - 1))
        if target is None:  # the difference may be preds itself: not in place
            return (difference * scale).to(preds.dtype), None
        if not preds_wanted:  # d/dtarget = -2 (preds - target) grad: the sign folded into the scale
            return None, difference.mul_(-scale).to(target.dtype)
        scaled = difference.mul_(scale)
        return scaled.to(preds.dtype), (-scaled).to(target.dtype) if target_wanted else None


def integer_squared_error_parts(preds: Tensor, target: Tensor) -> Tensor:
    """``[N, R]`` non-negative float64 values, each exact, whose exact sum per sample is ``sum((preds - target)**2)``
    of integer inputs (int8 ... int64, uint8): no value passes through a float.

    ``|preds - target|`` is formed exactly in int64 (for int64 inputs as a high and a low 32-bit part, which int64
    subtraction could overflow otherwise), split into 16-bit limbs ``a_j``, and the per-sample sums of the limb
    products ``a_j * a_k`` (each below ``2**33``) are summed in int64: exact, in any order, on any device. Each such
    sum is written as two float64 numbers of at most 32 bits, scaled by the power of two the limbs stand for.
    Integer addition does not round, so the exact accumulators of :mod:`pl_pmse.exact` receive the exact value.

    Example:
        >>> preds, target = torch.tensor([[2**31 - 1, -2**31]]), torch.tensor([[2**31 - 2, -2**31 + 3]])
        >>> integer_squared_error_parts(preds, target).sum().item()  # differences 1 and 3
        10.0
    """
    n = preds.shape[0]
    wide = torch.int64 in (preds.dtype, target.dtype)
    limbs = 4 if wide else 1 if max(preds.element_size(), target.element_size()) <= 2 else 2
    pairs = [(j, k) for j in range(limbs) for k in range(j, limbs)]
    if n == 0:
        return torch.zeros(0, 2 * len(pairs), dtype=torch.float64, device=preds.device)
    per_sample = preds[0].numel()
    if per_sample >= 1 << 29:
        raise ValueError(
            f"preds and target: integer samples of {per_sample} elements exceed the exact integer sums' range "
            f"(2**29 elements per sample); pass smaller samples"
        )
    preds, target = preds.reshape(n, per_sample), target.reshape(n, per_sample)
    sums = torch.zeros(n, len(pairs), dtype=torch.int64, device=preds.device)
    rows = max(1, BLOCK_ELEMENTS // per_sample)
    columns = min(per_sample, BLOCK_ELEMENTS)
    for start in range(0, n, rows):
        for first in range(0, per_sample, columns):
            block = (slice(start, start + rows), slice(first, first + columns))
            digits = _limbs(preds[block], target[block], limbs, wide)
            for index, (j, k) in enumerate(pairs):
                sums[start : start + rows, index] += (digits[j] * digits[k]).sum(1) * (1 if j == k else 2)
    weight = torch.tensor([16.0 * (j + k) for j, k in pairs], dtype=torch.float64, device=preds.device)
    high, low = (sums >> 31).double(), (sums & ((1 << 31) - 1)).double()  # each below 2**32: exact in float64
    return torch.cat([torch.ldexp(high, weight + 31), torch.ldexp(low, weight)], 1)


def _limbs(preds: Tensor, target: Tensor, count: int, wide: bool) -> list[Tensor]:
    """``|preds - target|`` as ``count`` int64 limbs of 16 bits, lowest first (one limb: the whole value, below
    ``2**17`` for inputs of at most 16 bits)."""
    if not wide:
        magnitude = (preds.long() - target.long()).abs_()
        if count == 1:
            return [magnitude]
        high, low = magnitude >> 32, magnitude & 0xFFFFFFFF
    else:  # int64: the difference (up to 2**64) as high * 2**32 + low, then its magnitude, with one borrow
        preds, target = preds.long(), target.long()
        high, low = (preds >> 32) - (target >> 32), (preds & 0xFFFFFFFF) - (target & 0xFFFFFFFF)
        negative = (high < 0) | ((high == 0) & (low < 0))
        high, low = torch.where(negative, -high, high), torch.where(negative, -low, low)
        borrow = (low < 0).long()
        high, low = high - borrow, low + (borrow << 32)
    return [low & 0xFFFF, low >> 16, high & 0xFFFF, high >> 16][:count]


def compute_dtype(preds: Tensor, target: Tensor | None = None) -> torch.dtype:
    """float64 when either input is float64, float32 otherwise (half, bfloat16 and integers included)."""
    return torch.float64 if torch.float64 in (preds.dtype, getattr(target, "dtype", None)) else torch.float32


def _difference(preds: Tensor, target: Tensor | None) -> Tensor:
    """``preds - target`` (``preds`` for None) in the compute dtype."""
    dtype = compute_dtype(preds, target)
    return preds.to(dtype) if target is None else preds.to(dtype) - target.to(dtype)


def _memory_order(preds: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Permute both inputs so that each sample is contiguous when they share a layout (e.g. channels_last).

    A sum over a sample does not depend on the order of its elements, so reading them in memory order
    avoids a copy. Inputs with different or overlapping layouts are left as they are (copied block by block).
    """
    if preds.dim() < 3 or (target is not None and preds.stride() != target.stride()):
        return preds, target
    order = sorted(range(1, preds.dim()), key=lambda dim: -preds.stride(dim))
    permuted = preds.permute(0, *order)
    if permuted[:1].is_contiguous():
        return permuted, None if target is None else target.permute(0, *order)
    return preds, target


def _streaming_sums(preds: Tensor, target: Tensor | None) -> Tensor:
    n = preds.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.float64, device=preds.device)
    dtype, per_sample = compute_dtype(preds, target), preds[0].numel()
    chunks, tail = divmod(per_sample, CHUNK)
    # Every kernel call sees the same shapes whatever the batch size (the last block is padded with zeros), so
    # that no backend can pick a different reduction order for a sample because of its neighbours.
    rows = min(MAX_ROWS, max(1, BLOCK_ELEMENTS // per_sample))
    preds = _rows(preds, per_sample)
    target = None if target is None else _rows(target, per_sample)
    out = torch.empty(n, dtype=torch.float64, device=preds.device)
    buffer: Tensor | None = None  # the padded block, allocated when first needed
    partials = torch.zeros(rows, chunks + 1, dtype=dtype, device=preds.device)
    for start in range(0, n, rows):
        count = min(rows, n - start)
        p = preds[start : start + count].reshape(-1, per_sample).to(dtype)
        if target is None and count == rows and p.is_contiguous():
            block = p  # a full block of a difference computed already: read in place, no copy
        else:
            if buffer is None:  # every row is written below: the padding rows with zeros
                buffer = torch.empty(rows, per_sample, dtype=dtype, device=preds.device)
            if target is None:
                buffer[:count].copy_(p)
            else:
                torch.sub(p, target[start : start + count].reshape(-1, per_sample).to(dtype), out=buffer[:count])
            buffer[count:].zero_()
            block = buffer
        if chunks:
            whole = block[:, : chunks * CHUNK].view(rows, chunks, CHUNK)
            torch.linalg.vecdot(whole, whole, out=partials[:, :chunks])
        if tail:
            partials[:, chunks] = torch.linalg.vecdot(block[:, chunks * CHUNK :], block[:, chunks * CHUNK :])
        out[start : start + count] = partials.sum(1, dtype=torch.float64)[:count]
    return out


def _rows(x: Tensor, per_sample: int) -> Tensor:
    """``[N, per_sample]`` as a view when the layout allows it (blocks are copied one by one otherwise)."""
    try:
        return x.view(x.shape[0], per_sample)
    except RuntimeError:
        return x
