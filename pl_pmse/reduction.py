"""Per-sample sums of squared differences, shaped for the device, each sample's value independent of its batch.

**CPU: streaming.** The batch is walked in blocks of about ``BLOCK_ELEMENTS`` elements (whole samples, or column
blocks of a long sample), never as a full-size temporary: a block is subtracted and summed in chunks of ``CHUNK``
elements (float32 for inputs of 32 bits or fewer, float64 for float64 input), and the chunk sums are added per
sample in float64. Every sum runs along one row of a fixed length, which the CPU kernels reduce row by row in one
order (below their parallel grain of 32768 elements), so a sample's value never depends on its neighbours.

**Accelerators (CUDA, ...): few full-size kernels.** A GPU reduction's order depends on the shape of the whole
launch (how many rows, how many blocks per row), so float sums would change with the batch. Spaces whose features
are exact elementwise arithmetic (``Space.exact_features``: pixel, waveform, pyramid) are summed in integers
instead (:func:`fixed_point_square_sums`): each sample's squares are scaled by a power of two chosen from its
largest square and cut into three 30-bit integer words on the grid of :mod:`pl_pmse.exact`, and integer sums do
not depend on their order. About 15 kernels per component whatever the size, and the metric's state receives the
words exactly. Other spaces (networks, FFTs: their features are equal to rounding on a GPU anyway) are summed in
float64 by one reduction per component.

The value always comes from the same path, with or without autograd; the gradient is the plain formula's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from .exact import DIGIT_BITS, device_constant

BLOCK_ELEMENTS = 1 << 19
CHUNK = 2048
ACCELERATOR_ELEMENTS = 1 << 28  # bounds the full-size temporaries on an accelerator (samples are split beyond it)


@dataclass(frozen=True)
class SquareSums:
    """Per-sample sums of squared differences of ``K`` components.

    Attributes:
        values: ``[N, K]`` float64 (differentiable where an input requires grad).
        words, digit: on accelerators for exact spaces, the sums as fixed-point integers (``[N, K, 3]`` int64 and
            ``[N, K]`` int64, see :func:`pl_pmse.exact.add_fixed`); None otherwise.
    """

    values: Tensor
    words: Tensor | None = None
    digit: Tensor | None = None


def squared_error_sums(preds: Tensor, target: Tensor | None = None) -> Tensor:
    """Sum of ``(preds - target) ** 2`` over all but the first dimension, one float64 value per sample
    (``target=None``: the sum of ``preds ** 2``, for a difference computed already).

    Integer inputs are summed exactly (:func:`integer_squared_error_parts`; the metric's state receives those exact
    parts), their sum here in float64. On accelerators the integer words give the value (see the module doc).
    Under ``torch.compile`` the plain formula gives the value (equal to float32 rounding; the compiler fuses it).

    Example:
        >>> p, t = torch.ones(2, 3), torch.zeros(2, 3)
        >>> squared_error_sums(p, t)
        tensor([3., 3.], dtype=torch.float64)
    """
    if not preds.is_floating_point():
        return integer_squared_error_parts(preds, target).sum(1)
    return square_sums([(preds, target)]).values[:, 0]


def square_sums(pairs: list[tuple[Tensor, Tensor | None]], exact: bool = True) -> SquareSums:
    """:func:`squared_error_sums` of each ``(preds, target)`` pair (floating point), as the columns of one
    :class:`SquareSums`; with the integer words where the device and ``exact`` call for them."""
    if torch.compiler.is_compiling():
        return SquareSums(torch.stack([_plain(p, t) for p, t in pairs], 1))
    with torch.no_grad():
        if works_in_cache_blocks(pairs[0][0].device):
            columns = [_streaming_sums(*_memory_order(p, t)) for p, t in pairs]
            sums = SquareSums(columns[0][:, None] if len(columns) == 1 else torch.stack(columns, 1))
        elif exact:
            sums = fixed_point_square_sums([_difference(p, t) for p, t in pairs])
        else:
            sums = SquareSums(torch.stack([_plain(p, t) for p, t in pairs], 1))
    if not torch.is_grad_enabled() or not any(x is not None and x.requires_grad for pair in pairs for x in pair):
        return sums
    values = torch.stack([_PlainGradient.apply(sums.values[:, k], p, t) for k, (p, t) in enumerate(pairs)], 1)
    return SquareSums(values, sums.words, sums.digit)


def works_in_cache_blocks(device: torch.device) -> bool:
    """Whether work on ``device`` is shaped for a CPU cache (blocks) rather than for an accelerator (few large
    kernels): the one place that decides, for the sums here and for the pyramid."""
    return device.type == "cpu"


def _plain(preds: Tensor, target: Tensor | None) -> Tensor:
    """The squares in the compute dtype (one kernel: ``mse_loss`` without reduction), summed per sample in float64."""
    dtype = compute_dtype(preds, target)
    if target is None:
        squares = preds.to(dtype).square()
    else:
        squares = F.mse_loss(preds.to(dtype), target.to(dtype), reduction="none")
    return squares.reshape(squares.shape[0], -1).sum(1, dtype=torch.float64)


class _PlainGradient(torch.autograd.Function):
    """The given per-sample sums, with the plain formula's gradient ``2 * (preds - target) * grad`` in the inputs'
    float dtype (at least float32); saves the inputs (views, no copy)."""

    @staticmethod
    def forward(sums: Tensor, preds: Tensor, target: Tensor | None) -> Tensor:
        return sums.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor | None], output: Tensor) -> None:
        ctx.save_for_backward(*inputs[1:])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor | None, Tensor | None]:
        preds, target = ctx.saved_tensors
        _, preds_wanted, target_wanted = ctx.needs_input_grad
        difference = _difference(preds, target)
        scale = (2 * grad.to(difference.dtype)).view(-1, *(1,) * (preds.dim() - 1))
        if target is None:  # the difference may be preds itself: not in place
            return None, (difference * scale).to(preds.dtype), None
        if not preds_wanted:  # d/dtarget = -2 (preds - target) grad: the sign folded into the scale
            return None, None, difference.mul_(-scale).to(target.dtype)
        scaled = difference.mul_(scale)
        return None, scaled.to(preds.dtype), (-scaled).to(target.dtype) if target_wanted else None


def fixed_point_square_sums(differences: list[Tensor]) -> SquareSums:
    """The per-sample sums of squares of each difference (``[N, ...]`` float), computed in integers.

    Per sample and component: the float64 squares (exact for inputs of 32 bits or fewer) are multiplied by a power
    of two chosen from the largest of them (:func:`pl_pmse.exact.fixed_point_layout`), so that the scaled squares
    lie below ``2**30`` in units of a grid digit; their integer parts, then the next 30 bits twice, are summed in
    int64 (three words, each sum below ``2**60``). Integer addition is exact in any order, so the words, and the
    float64 value made from them, depend on the sample only. The value is within ``E * 2**-60`` of the largest square
    (``E`` elements) of the float64 sum; NaN or inf anywhere, or a square of ``2**1004`` or more (see
    :func:`pl_pmse.exact.fixed_point_layout`), gives a NaN value.

    Example:
        >>> sums = fixed_point_square_sums([torch.tensor([[3.0, 4.0]])])
        >>> sums.values
        tensor([[25.]], dtype=torch.float64)
    """
    n = differences[0].shape[0]
    sizes = [math.prod(d.shape[1:]) for d in differences]
    if max(sizes) >= 1 << 30:
        raise ValueError(
            f"preds and target: samples of {max(sizes)} elements exceed the exact sums' range on an accelerator "
            f"(2**30 elements per sample and component); pass smaller samples"
        )
    rows = max(1, ACCELERATOR_ELEMENTS // max(sum(sizes), 1))
    if n > rows:  # bounded temporaries: samples in groups (each sample's words do not depend on its group)
        parts = [fixed_point_square_sums([d[i : i + rows] for d in differences]) for i in range(0, n, rows)]
        return SquareSums(*(torch.cat([getattr(p, name) for p in parts]) for name in ("values", "words", "digit")))
    squares = [_squares(d.reshape(n, size)) for d, size in zip(differences, sizes, strict=True)]
    if not n:
        largest = squares[0].new_zeros(0, len(squares))
    elif len(squares) == 1:
        largest = squares[0].amax(1, keepdim=True)
    else:
        largest = torch.stack([s.amax(1) for s in squares], 1)
    code = largest.to(torch.float64).view(torch.int64) >> 52 & 2047
    scale, unit, digit = device_constant("fixed point", largest.device)[code].unbind(-1)
    words = []
    for k, scaled in enumerate(squares):
        scaled.mul_(scale[:, k, None])
        for j in range(3):
            if j:
                scaled.frac_().mul_(float(1 << DIGIT_BITS))
            words.append(scaled.to(torch.int64).sum(1))
    words = torch.stack(words, 1).view(n, len(squares), 3)
    real = words.double()
    lower = torch.add(real[..., 1], real[..., 2], alpha=2.0**-DIGIT_BITS)
    values = torch.add(real[..., 0], lower, alpha=2.0**-DIGIT_BITS) * unit
    return SquareSums(values, words, digit.long())


def _squares(difference: Tensor) -> Tensor:
    """float64 squares in a new tensor (exact for a difference of 32 bits or fewer)."""
    return difference.double().square() if difference.dtype != torch.float64 else difference.square()


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
    wide = preds.dtype == torch.float64 or (target is not None and target.dtype == torch.float64)
    return torch.float64 if wide else torch.float32  # no getattr on a tensor: torch 2.4's compiler cannot trace it


def _difference(preds: Tensor, target: Tensor | None) -> Tensor:
    """``preds - target`` (``preds`` for None) in the compute dtype."""
    dtype = compute_dtype(preds, target)
    return preds.to(dtype) if target is None else preds.to(dtype) - target.to(dtype)


def _memory_order(preds: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Permute both inputs so that each sample is contiguous when they share a layout (e.g. channels_last).

    A sum over a sample does not depend on the order of its elements, so reading them in memory order
    avoids a copy. Inputs with different or overlapping layouts are left as they are (copied block by block).
    """
    if preds.dim() < 3 or preds.is_contiguous() or (target is not None and preds.stride() != target.stride()):
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
    preds = _rows(preds, per_sample)
    target = None if target is None else _rows(target, per_sample)
    rows = max(1, BLOCK_ELEMENTS // per_sample)
    if n * per_sample <= BLOCK_ELEMENTS and preds.dim() == 2 and (target is None or target.dim() == 2):  # one block
        return _block_sums(_difference(preds, target), per_sample, scratch=target is not None)
    columns = per_sample if rows > 1 else BLOCK_ELEMENTS  # a long sample in column blocks (a multiple of CHUNK)
    out = None
    buffer = torch.empty(min(rows, n) * min(columns, per_sample), dtype=dtype, device=preds.device)  # reused
    for first in range(0, per_sample, columns):
        width = min(columns, per_sample - first)
        sums = []
        for start in range(0, n, rows):
            p = preds[start : start + rows].reshape(-1, per_sample)[:, first : first + width]
            block = buffer[: p.shape[0] * width].view(p.shape[0], width)
            if target is None:
                block.copy_(p)  # a difference computed already: copied (squared in place next)
            else:
                torch.sub(p.to(dtype), target[start : start + rows].reshape(-1, per_sample)[
                    :, first : first + width].to(dtype), out=block)  # fmt: skip
            sums.append(_block_sums(block, width, scratch=True))
        total = sums[0] if len(sums) == 1 else torch.cat(sums)
        out = total if out is None else out.add_(total)
    return out


def _block_sums(block: Tensor, width: int, scratch: bool = False) -> Tensor:
    """float64 row sums of the squares of ``[rows, width]``: per chunk of ``CHUNK`` in the block's dtype, then the
    chunk sums in float64. A ``scratch`` block (a buffer of ours) is squared in place (no temporary)."""
    squares = block.square_() if scratch else block.square()
    chunks, tail = divmod(width, CHUNK)
    rows = squares.shape[0]
    partials = [squares[:, : chunks * CHUNK].reshape(rows, chunks, CHUNK).sum(2)] if chunks else []
    if tail:
        partials.append(squares[:, chunks * CHUNK :].sum(1, keepdim=True))
    return (partials[0] if len(partials) == 1 else torch.cat(partials, 1)).sum(1, dtype=torch.float64)


def _rows(x: Tensor, per_sample: int) -> Tensor:
    """``[N, per_sample]`` as a view when the layout allows it (blocks are copied one by one otherwise)."""
    try:
        return x.view(x.shape[0], per_sample)
    except RuntimeError:
        return x
