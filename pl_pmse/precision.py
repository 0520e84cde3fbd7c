"""A measurement runs in its own precision: the caller's autocast and TF32 settings never reach it.

Lightning's ``16-mixed`` / ``bf16-mixed`` run ``validation_step`` (and the training loss) under ``torch.autocast``,
which would run a space's convolutions and matmuls in half precision (the mel analysis overflows float16 on a
full-scale signal); cuDNN, cuBLAS and oneDNN may use TF32 or bfloat16 inner products for float32 work (cuDNN does by
default; ``torch.set_float32_matmul_precision("high")`` asks all three). Inside :func:`own_precision` none of this
applies: a space computes in its own dtype (float32 for the built-in ones), whatever the context, so the metric and
the loss give the float32 value of the same inputs. Gradients still flow into a half-precision graph (the casts are
differentiable).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch


def own_precision(device: torch.device, inner_products: bool = True) -> contextlib.AbstractContextManager:
    """A context with autocast off for ``device``'s type and full float32 precision for the matmuls and convolutions
    of cuBLAS, cuDNN and oneDNN (no TF32 or bfloat16 inner products, which ``torch.set_float32_matmul_precision``
    and cuDNN's defaults allow), restored when the last measurement in the process ends. These are process-wide
    settings: another thread's work during a measurement runs with full precision too. Under ``torch.compile`` only
    autocast is turned off (the compiled graph is traced as a plain ``with torch.autocast(...)``), and so it is for
    ``inner_products=False`` (work that no matmul or convolution library sees: elementwise arithmetic and sums).

    Example:
        >>> with torch.autocast("cpu", dtype=torch.bfloat16), own_precision(torch.device("cpu")):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.float32
    """
    autocast_off = (
        torch.autocast(device.type, enabled=False) if device.type in _AUTOCAST_TYPES else contextlib.nullcontext()
    )
    if not inner_products or torch.compiler.is_compiling():
        return autocast_off
    return _both(autocast_off, _ieee_float32())


_AUTOCAST_TYPES = frozenset(
    t for t in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia") if torch.amp.is_autocast_available(t)
)


@contextlib.contextmanager
def _both(first: contextlib.AbstractContextManager, second: contextlib.AbstractContextManager) -> Iterator[None]:
    with first, second:
        yield


def _full_precision_settings() -> tuple[tuple[Callable[[], object], Callable[[object], None], object], ...]:
    """``(read, write, full-precision value)`` for each process-wide float32 precision flag of this torch: the
    ``fp32_precision`` flags where torch has them (mixing them with the legacy ones raises there), the legacy
    ``allow_tf32`` flags and ``float32_matmul_precision`` before (torch < 2.9)."""

    def flag(holder: object, name: str, value: object) -> tuple[Callable[[], object], Callable[[object], None], object]:
        return (lambda: getattr(holder, name)), (lambda new: setattr(holder, name, new)), value

    backends = torch.backends
    if hasattr(backends.mkldnn, "conv") and hasattr(backends.cudnn, "conv"):
        holders = (backends.cudnn.conv, backends.cuda.matmul, backends.mkldnn.matmul, backends.mkldnn.conv)
        return tuple(flag(holder, "fp32_precision", "ieee") for holder in holders)
    return (
        flag(backends.cuda.matmul, "allow_tf32", False),
        flag(backends.cudnn, "allow_tf32", False),
        (torch.get_float32_matmul_precision, torch.set_float32_matmul_precision, "highest"),  # oneDNN's bfloat16 too
    )


_SETTINGS = _full_precision_settings()
_LOCK = threading.Lock()
_ACTIVE = [0]  # measurements in progress in this process: the first sets the flags, the last restores them
_SAVED: list[object] = []


@contextlib.contextmanager
def _ieee_float32() -> Iterator[None]:
    with _LOCK:
        if not _ACTIVE[0]:
            _SAVED[:] = [read() for read, _, _ in _SETTINGS]
            for _, write, value in _SETTINGS:
                write(value)
        _ACTIVE[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            _ACTIVE[0] -= 1
            if not _ACTIVE[0]:
                for (_, write, _), value in reversed(list(zip(_SETTINGS, _SAVED, strict=True))):
                    write(value)  # in reverse: the legacy matmul precision also writes cuda.matmul.allow_tf32
