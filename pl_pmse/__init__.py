"""pl-pmse: Perception MSE for PyTorch, torchmetrics and Lightning.

Public API: :class:`PerceptionMSE` (a torchmetrics Metric), :func:`perception_mse` (differentiable),
:func:`perception_mse_components`, :class:`PerceptionMSECallback` (Lightning), :class:`ErrorProfile`,
:class:`ImageFidelity` (SSIM and sharpness), :class:`MelCepstralDistortion` and :mod:`pl_pmse.spaces`.
"""

import importlib

from .versions import require

require("torch")  # an older torch fails deep inside it: say so here

from . import spaces  # noqa: E402
from .functional import perception_mse, perception_mse_components  # noqa: E402
from .spaces import Space, available_spaces, get_space, register_space  # noqa: E402

__version__ = "0.2.0"

# Names that load on first use: ``import pl_pmse`` imports torch only (not torchmetrics, torchvision, torchaudio,
# Lightning, W&B or matplotlib); ``from pl_pmse import PerceptionMSE`` then imports torchmetrics.
_LAZY = {
    "PerceptionMSE": ".metric",
    "ErrorProfile": ".profile",
    "ImageFidelity": ".fidelity",
    "MelCepstralDistortion": ".mcd",
    "PerceptionMSECallback": ".callback",
    "ExactEvaluation": ".callback",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pl_pmse' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "ErrorProfile",
    "ExactEvaluation",
    "ImageFidelity",
    "MelCepstralDistortion",
    "PerceptionMSE",
    "PerceptionMSECallback",
    "Space",
    "__version__",
    "available_spaces",
    "get_space",
    "perception_mse",
    "perception_mse_components",
    "register_space",
    "spaces",
]
