"""User-facing errors.

Every error a user can cause is a :class:`DreamFlowError` whose message is one line: what was asked,
what was found or searched, and how to fix it. ComfyUI shows the message as is; the headless runner
prints it without a traceback.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


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


def is_out_of_memory(error: BaseException) -> bool:
    """True for an allocation failure: Python's / numpy's MemoryError, CUDA's OutOfMemoryError, or torch's
    CPU allocator ("DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(error, MemoryError):
        return True
    name = type(error).__name__
    if name == "OutOfMemoryError":
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text
                                                or "not enough memory" in text or "cannot allocate memory" in text)


def memory_kind(error: BaseException) -> str:
    """"GPU" for CUDA's out-of-memory error, else "CPU"."""
    return "GPU" if type(error).__name__ == "OutOfMemoryError" or "cuda" in str(error).lower() else "CPU"


@contextmanager
def explain_memory(what: str, lower: str) -> Iterator[None]:
    """Running out of memory inside the block becomes one line: ``<what> ran out of CPU memory; lower <lower>``."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, DreamFlowError) or not is_out_of_memory(e):
            raise
        raise DreamFlowError(f"{what} ran out of {memory_kind(e)} memory; lower {lower}") from None


def check(condition: bool, message: str) -> None:
    """Raise :class:`DreamFlowError` with ``message`` unless ``condition`` (never ``assert`` on user input)."""
    if not condition:
        raise DreamFlowError(message)
