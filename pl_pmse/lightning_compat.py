"""Both Lightning namespaces: ``lightning.pytorch`` (``import lightning as L``) and ``pytorch_lightning``.

Their classes are distinct (a ``pytorch_lightning.Callback`` is not a ``lightning.pytorch.Callback``), so the
callback derives from the ``Callback`` of every installed package (the sinks recognise the loggers of both by class
name, without importing either). Nothing else in pl-pmse imports Lightning.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .versions import require

NAMESPACES = ("lightning.pytorch", "pytorch_lightning")


def _installed() -> tuple[ModuleType, ...]:
    packages = []
    for name in NAMESPACES:
        try:
            packages.append(importlib.import_module(name))
        except ImportError:
            continue
        require(name.split(".")[0])  # installed, but older than pl-pmse supports: a clear error
    if not packages:
        raise ImportError(
            "PerceptionMSECallback needs Lightning: pip install lightning (import lightning as L) or pytorch-lightning"
        )
    return tuple(packages)


PACKAGES = _installed()
CALLBACK_BASES: tuple[type, ...] = tuple(package.Callback for package in PACKAGES)
