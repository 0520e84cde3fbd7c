"""pl-pmse: Perception MSE for PyTorch, torchmetrics and Lightning.

Public API: :class:`PerceptionMSE` (a torchmetrics Metric), :func:`perception_mse` (differentiable),
:func:`perception_mse_components`, :class:`PerceptionMSECallback` (Lightning), :class:`ErrorProfile` and
:mod:`pl_pmse.spaces`.
"""

from . import spaces
from .functional import perception_mse, perception_mse_components
from .metric import PerceptionMSE
from .spaces import Space, available_spaces, get_space, register_space

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """Lightning-facing names load on first use: ``import pl_pmse`` does not import Lightning or W&B."""
    if name == "PerceptionMSECallback":
        from .callback import PerceptionMSECallback

        return PerceptionMSECallback
    if name == "ErrorProfile":
        from .profile import ErrorProfile

        return ErrorProfile
    raise AttributeError(f"module 'pl_pmse' has no attribute {name!r}")


__all__ = [
    "ErrorProfile",
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
