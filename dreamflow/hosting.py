"""The only place that touches ComfyUI: optional, lazy imports of ``comfy.*`` and ``folder_paths``.

Engine code asks this module for paths, progress and interrupts; headless (no ComfyUI importable)
every hook degrades to a plain-Python equivalent, so the engine runs in scripts, tests and CI.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from typing import Callable, Optional

#: Option key our nodes set on dropdowns filled from this machine's files (models, state files):
#: a workflow saved on another machine may name a file not listed here, so the runner checks these
#: when the node runs (the engine's loaders give the one-line error), not against the list.
DYNAMIC_LIST = "dreamflow_dynamic"


def folder_paths():
    """ComfyUI's ``folder_paths`` module when hosted, else ``None``."""
    try:
        import folder_paths as fp  # type: ignore

        return fp
    except Exception:
        return None


def comfy_module(name: str):
    """``comfy.<name>`` (e.g. ``"utils"``, ``"model_management"``) when hosted, else ``None``."""
    try:
        import importlib

        return importlib.import_module(f"comfy.{name}")
    except Exception:
        return None


def output_directory(default: str = "output") -> str:
    """ComfyUI's output folder when hosted, else ``$DREAMFLOW_OUTPUT`` or ``./output``."""
    fp = folder_paths()
    if fp is not None:
        return fp.get_output_directory()
    return os.path.abspath(os.environ.get("DREAMFLOW_OUTPUT", default))


# --------------------------------------------------------------------------------------------
# Interrupts
# --------------------------------------------------------------------------------------------
_headless_interrupt = threading.Event()


def request_interrupt() -> None:
    """Ask the running stage to stop at its next update (headless equivalent of ComfyUI's cancel)."""
    _headless_interrupt.set()


def clear_interrupt() -> None:
    _headless_interrupt.clear()


def interrupt_requested() -> bool:
    """True when ComfyUI's cancel was pressed or :func:`request_interrupt` was called."""
    mm = comfy_module("model_management")
    if mm is not None and getattr(mm, "processing_interrupted", None) is not None:
        try:
            if mm.processing_interrupted():
                return True
        except Exception:
            pass
    return _headless_interrupt.is_set()


def raise_interrupt(message: str) -> None:
    """Stop the running stage: ComfyUI's own InterruptProcessingException when hosted (the UI then shows
    "interrupted", not an error), else :class:`~dreamflow.errors.DreamFlowInterrupted`."""
    from .errors import DreamFlowInterrupted

    mm = comfy_module("model_management")
    if mm is not None and hasattr(mm, "throw_exception_if_processing_interrupted"):
        mm.throw_exception_if_processing_interrupted()
    raise DreamFlowInterrupted(message)


class sigint_as_interrupt:
    """Context manager (headless runner): Ctrl-C sets the interrupt flag instead of killing mid-write."""

    def __enter__(self):
        clear_interrupt()
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, lambda *_: request_interrupt())
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------
@dataclass
class Callbacks:
    """Hooks a stage calls once per update. All optional; see :func:`default_callbacks`.

    ``progress(step, total, preview)``: ``preview`` is a PIL image or ``None``.
    ``should_stop()``: True stops the stage within this update (raises DreamFlowInterrupted).
    ``preview_every``: render a preview image every this many updates (0: never).
    """

    progress: Optional[Callable[[int, int, object], None]] = None
    should_stop: Callable[[], bool] = interrupt_requested
    preview_every: int = 0
    log: Optional[Callable[[dict], None]] = None


def comfy_progress(total: int, preview_every: int = 25) -> Callbacks:
    """Callbacks wired to ComfyUI's progress bar with live JPEG previews; tqdm headless."""
    cu = comfy_module("utils")
    if cu is not None and hasattr(cu, "ProgressBar"):
        bar = cu.ProgressBar(total)

        def progress(step, total_, preview):
            if preview is not None:
                bar.update_absolute(step, total_, ("JPEG", preview, 512))
            else:
                bar.update_absolute(step, total_)

        return Callbacks(progress=progress, preview_every=preview_every)
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, leave=False, dynamic_ncols=True)

        def progress(step, total_, preview):
            bar.n = step
            bar.refresh()
            if step >= total_:
                bar.close()

        return Callbacks(progress=progress, preview_every=0)
    except Exception:
        return Callbacks()


def free_memory() -> None:
    """Release cached GPU memory (after a stage, or when a node unloads our models)."""
    import gc

    gc.collect()
    mm = comfy_module("model_management")
    if mm is not None and hasattr(mm, "soft_empty_cache"):
        try:
            mm.soft_empty_cache()
            return
        except Exception:
            pass
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass
