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
from collections.abc import Iterator

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


# torch's current precision flags (mixing them with the legacy ``allow_tf32`` ones raises in torch)
_SETTINGS = (torch.backends.cudnn.conv, torch.backends.cuda.matmul, torch.backends.mkldnn.matmul,
             torch.backends.mkldnn.conv)  # fmt: skip
_LOCK = threading.Lock()
_ACTIVE = [0]  # measurements in progress in this process: the first sets the flags, the last restores them
_SAVED: list[str] = []


@contextlib.contextmanager
def _ieee_float32() -> Iterator[None]:
    with _LOCK:
        if not _ACTIVE[0]:
            _SAVED[:] = [setting.fp32_precision for setting in _SETTINGS]
            for setting in _SETTINGS:
                setting.fp32_precision = "ieee"
        _ACTIVE[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            _ACTIVE[0] -= 1
            if not _ACTIVE[0]:
                for setting, value in zip(_SETTINGS, _SAVED, strict=True):
                    setting.fp32_precision = value
