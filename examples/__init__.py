"""Runnable examples of pl-pmse (``python examples/<name>.py --help``)."""
