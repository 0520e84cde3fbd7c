"""A measurement runs in its own precision: the caller's autocast and TF32 settings never reach it.

Lightning's ``16-mixed`` / ``bf16-mixed`` run ``validation_step`` (and the training loss) under ``torch.autocast``,
which would run a space's convolutions and matmuls in half precision (the mel matmul overflows float16 on a full-scale
signal); cuDNN and cuBLAS may use TF32 for float32 work (cuDNN does by default). Inside :func:`own_precision` neither
applies: a space computes in its own dtype (float32 for the built-in ones), whatever the context, so the metric and the
loss give the float32 value of the same inputs. Gradients still flow into a half-precision graph (the casts are
differentiable).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def own_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """A context with autocast off for ``device``'s type and, on CUDA, full float32 precision for cuDNN convolutions
    and cuBLAS matmuls (TF32 off), restored on exit. TF32 is a process-wide setting: another thread's CUDA work that
    runs during a measurement runs without TF32 too. Under ``torch.compile`` only autocast is turned off (the compiled
    graph is traced as a plain ``with torch.autocast(...)``).

    Example:
        >>> with torch.autocast("cpu", dtype=torch.bfloat16), own_precision(torch.device("cpu")):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.float32
    """
    if device.type == "cuda" and not torch.compiler.is_compiling():
        return _cuda_float32()
    if device.type in _AUTOCAST_TYPES:
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


_AUTOCAST_TYPES = frozenset(
    t for t in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla") if torch.amp.is_autocast_available(t)
)


@contextlib.contextmanager
def _cuda_float32() -> Iterator[None]:
    with torch.autocast("cuda", enabled=False), _ieee_float32():
        yield


@contextlib.contextmanager
def _ieee_float32() -> Iterator[None]:
    """cuDNN convolutions and cuBLAS matmuls in IEEE float32 (no TF32), with torch's own flags (the current API:
    mixing it with the legacy ``allow_tf32`` flags raises in torch)."""
    settings = (torch.backends.cudnn.conv, torch.backends.cuda.matmul)
    before = [setting.fp32_precision for setting in settings]
    try:
        for setting in settings:
            setting.fp32_precision = "ieee"
        yield
    finally:
        for setting, value in zip(settings, before, strict=True):
            setting.fp32_precision = value
