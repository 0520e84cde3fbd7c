"""The oldest releases pl-pmse runs on: pyproject.toml's floors, tested by ``make test-floors``.

An older release fails far from its cause (an ``AttributeError`` deep inside torch); :func:`require` turns that into
one error at import or first use that names the release found and the one needed. torch is checked when pl-pmse is
imported, the others where pl-pmse first imports them.
"""

from __future__ import annotations

import functools
import importlib
import re
from types import ModuleType

# import name -> (distribution name, oldest release); tests/test_packaging.py keeps this equal to pyproject.toml
MINIMUM: dict[str, tuple[str, tuple[int, ...]]] = {
    "torch": ("torch", (2, 4)),
    "torchaudio": ("torchaudio", (2, 4)),
    "torchvision": ("torchvision", (0, 19)),
    "torchmetrics": ("torchmetrics", (1, 6)),
    "pytorch_lightning": ("pytorch-lightning", (2, 5, 3)),
    "lightning": ("lightning", (2, 5, 3)),
}


def release(version: str) -> tuple[int, ...]:
    """The release numbers of a version string (local and pre-release parts dropped).

    Example:
        >>> release("2.4.0+cu121"), release("1.10.0rc1")
        ((2, 4, 0), (1, 10, 0))
    """
    found = re.match(r"\d+(\.\d+)*", version)
    if found is None:
        raise ValueError(f"version: {version!r} does not start with a release number")
    return tuple(int(part) for part in found.group().split("."))


@functools.cache
def require(name: str) -> ModuleType:
    """Import ``name`` (a key of :data:`MINIMUM`) and check that its release is one pl-pmse supports.

    Raises:
        ImportError: the installed release is older than pl-pmse's floor (the message names both).

    Example:
        >>> require("torch").__name__
        'torch'
    """
    module = importlib.import_module(name)
    distribution, oldest = MINIMUM[name]
    found = getattr(module, "__version__", "0")
    if release(found) < oldest:
        needed = ".".join(map(str, oldest))
        raise ImportError(
            f"pl-pmse needs {distribution} >= {needed}, found {found} ({module.__file__}): "
            f"pip install --upgrade '{distribution}>={needed}'"
        )
    return module
