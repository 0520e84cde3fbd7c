"""Per-sample sums of squared differences: a differentiable path and a fast streaming path.

The fast path (no autograd) never builds a full-size ``preds - target`` for the batch: it walks the
batch in blocks of about ``BLOCK_ELEMENTS`` elements, subtracts, and takes per-chunk dot products
(``CHUNK`` elements each, float32 for inputs of 32 bits or fewer, float64 for float64 input), which are then
added per sample in float64. A sample's value depends only on that sample, never on the rest of the batch,
so any batch split gives bit-identical per-sample values.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK_ELEMENTS = 1 << 19
CHUNK = 2048


def squared_error_sums(preds: Tensor, target: Tensor) -> Tensor:
    """Sum of ``(preds - target) ** 2`` over all but the first dimension, one value per sample.

    Differentiable (in the inputs' float dtype, at least float32) when autograd is recording and an input
    requires grad; otherwise float64 from the fast streaming path.

    Example:
        >>> p, t = torch.ones(2, 3), torch.zeros(2, 3)
        >>> squared_error_sums(p, t)
        tensor([3., 3.], dtype=torch.float64)
    """
    if torch.is_grad_enabled() and (preds.requires_grad or target.requires_grad):
        dtype = compute_dtype(preds, target)
        diff = preds.to(dtype) - target.to(dtype)
        return diff.square().reshape(diff.shape[0], -1).sum(1)
    with torch.no_grad():
        return _streaming_sums(*_memory_order(preds, target))


def compute_dtype(preds: Tensor, target: Tensor) -> torch.dtype:
    """float64 when either input is float64, float32 otherwise (half, bfloat16 and integers included)."""
    return torch.float64 if torch.float64 in (preds.dtype, target.dtype) else torch.float32


def _memory_order(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Permute both inputs so that each sample is contiguous when they share a layout (e.g. channels_last).

    A sum over a sample does not depend on the order of its elements, so reading them in memory order
    avoids a copy. Inputs with different or overlapping layouts are left as they are (copied block by block).
    """
    if preds.dim() < 3 or preds.stride() != target.stride():
        return preds, target
    order = sorted(range(1, preds.dim()), key=lambda dim: -preds.stride(dim))
    permuted = preds.permute(0, *order)
    if permuted[:1].is_contiguous():
        return permuted, target.permute(0, *order)
    return preds, target


def _streaming_sums(preds: Tensor, target: Tensor) -> Tensor:
    n = preds.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.float64, device=preds.device)
    dtype, per_sample = compute_dtype(preds, target), preds[0].numel()
    chunks, tail = divmod(per_sample, CHUNK)
    rows = min(n, max(1, BLOCK_ELEMENTS // per_sample))
    preds, target = _rows(preds, per_sample), _rows(target, per_sample)
    # One float partial per chunk of each sample (and one for its tail), added in float64 at the end.
    chunk_sums = torch.zeros(n, chunks, dtype=dtype, device=preds.device)
    tail_sums = torch.zeros(n, dtype=dtype, device=preds.device)
    diff = torch.empty(rows, per_sample, dtype=dtype, device=preds.device)
    diff_chunks, diff_tail = diff[:, : chunks * CHUNK].view(rows, chunks, CHUNK), diff[:, chunks * CHUNK :]
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        p, t = (x[start:stop].reshape(-1, per_sample).to(dtype) for x in (preds, target))  # views when possible
        torch.sub(p, t, out=diff[: stop - start])
        if chunks:
            block = diff_chunks[: stop - start]
            torch.linalg.vecdot(block, block, out=chunk_sums[start:stop])
        if tail:
            block = diff_tail[: stop - start]
            torch.linalg.vecdot(block, block, out=tail_sums[start:stop])
    return chunk_sums.sum(1, dtype=torch.float64) + tail_sums


def _rows(x: Tensor, per_sample: int) -> Tensor:
    """``[N, per_sample]`` as a view when the layout allows it (blocks are copied one by one otherwise)."""
    try:
        return x.view(x.shape[0], per_sample)
    except RuntimeError:
        return x
