"""The Lightning callback, in rooms: ``callback`` (hooks, arguments, saved state, scalars), ``selection`` (the
fixed and worst samples, gathered across ranks) and ``worker`` (the panel thread with bounded waits)."""

from .callback import PerceptionMSECallback

__all__ = ["PerceptionMSECallback"]
