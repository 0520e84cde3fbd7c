"""The Lightning callbacks, in rooms: ``callback`` (hooks, arguments, saved state, scalars), ``selection`` (the fixed
and worst samples, gathered across ranks), ``report`` (the epoch report and its drawing), ``worker`` (the panel
thread with bounded waits); ``exact_evaluation`` (the padding of metrics a LightningModule updates itself)."""

from .callback import PerceptionMSECallback
from .exact_evaluation import ExactEvaluation

__all__ = ["ExactEvaluation", "PerceptionMSECallback"]
