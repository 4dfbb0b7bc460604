"""User-facing errors.

Every error a user can cause is a :class:`DreamFlowError` whose message is one line: what was asked,
what was found or searched, and how to fix it. ComfyUI shows the message as is; the headless runner
prints it without a traceback.
"""

from __future__ import annotations


class DreamFlowError(ValueError):
    """A bad input or a failed run, explained in one line (what, where, fix)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class DreamFlowInterrupted(RuntimeError):
    """The user interrupted a stage (ComfyUI's cancel button or Ctrl-C headless); nothing was written."""


class DivergenceError(DreamFlowError):
    """A non-finite loss. ``step`` is the update that produced it; ``last_good`` the state before it."""

    def __init__(self, message: str, step: int, last_good=None):
        super().__init__(message)
        self.step = step
        self.last_good = last_good


def check(condition: bool, message: str) -> None:
    """Raise :class:`DreamFlowError` with ``message`` unless ``condition`` (never ``assert`` on user input)."""
    if not condition:
        raise DreamFlowError(message)
