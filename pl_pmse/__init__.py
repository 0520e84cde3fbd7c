"""pl-pmse: Perception MSE for PyTorch, torchmetrics and Lightning.

Public API: :class:`PerceptionMSE` (a torchmetrics Metric), :func:`perception_mse` (differentiable),
:func:`perception_mse_components`, and :mod:`pl_pmse.spaces`.
"""

from . import spaces
from .functional import perception_mse, perception_mse_components
from .metric import PerceptionMSE
from .spaces import Space, available_spaces, get_space, register_space

__version__ = "0.1.0.dev0"

__all__ = [
    "PerceptionMSE",
    "Space",
    "__version__",
    "available_spaces",
    "get_space",
    "perception_mse",
    "perception_mse_components",
    "register_space",
    "spaces",
]
