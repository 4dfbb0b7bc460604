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


def plain_progress(total: int, label: str = "update", stream=None, every_s: float = 30.0) -> Callable:
    """A progress callback that prints whole lines (``update 50/400 (12%), 31 s``) for logs that are not a
    terminal: about every 10% and at least every ``every_s`` seconds, and at the end; never a carriage return."""
    import sys
    import time

    start = time.monotonic()
    state = {"last_pct": -1, "last_t": start}
    step_pct = 10

    def progress(step, total_, preview):
        total_ = max(int(total_), 1)
        now = time.monotonic()
        pct = 100 * step // total_
        if step >= total_ or pct // step_pct > state["last_pct"] // step_pct or now - state["last_t"] >= every_s:
            state["last_pct"], state["last_t"] = pct, now
            print(f"{label} {step}/{total_} ({pct}%), {now - start:.0f} s", file=stream or sys.stderr, flush=True)

    return progress


def comfy_progress(total: int, preview_every: int = 25) -> Callbacks:
    """Callbacks wired to ComfyUI's progress bar with live JPEG previews; headless, a tqdm bar on a terminal
    and plain progress lines (:func:`plain_progress`) when the output goes to a file or pipe."""
    cu = comfy_module("utils")
    if cu is not None and hasattr(cu, "ProgressBar"):
        bar = cu.ProgressBar(total)

        def progress(step, total_, preview):
            if preview is not None:
                bar.update_absolute(step, total_, ("JPEG", preview, 512))
            else:
                bar.update_absolute(step, total_)

        return Callbacks(progress=progress, preview_every=preview_every)
    import sys

    if not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        return Callbacks(progress=plain_progress(total), preview_every=0)
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, leave=False, dynamic_ncols=True)

        def progress(step, total_, preview):
            bar.total = total_  # the stage's own count (a memory preset may run more, smaller updates)
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


# --------------------------------------------------------------------------------------------
# Sharing the card with ComfyUI
# --------------------------------------------------------------------------------------------
def _comfy_device(mm, device):
    """``device`` as ComfyUI's model management names it (``cuda`` -> ``cuda:<current>``: its loaded models
    compare devices with ``==``)."""
    import torch

    device = torch.device(device)
    if device.index is None and device.type == "cuda":
        try:
            main = mm.get_torch_device()
            if getattr(main, "type", None) == "cuda":
                return main
        except Exception:
            pass
        return torch.device("cuda", torch.cuda.current_device())
    return device


def make_room(device, memory_required: Optional[float] = None, why: str = "") -> bool:
    """Before DreamFlow loads or runs a denoiser on ``device``: ask ComfyUI's model management to free room, as
    its own loaders do (``comfy.model_management.free_memory``, which unloads the models ComfyUI manages, most
    recently used last, until enough memory is free; they are moved to RAM and reloaded when a node uses them).

    ``memory_required``: bytes the work needs (plus ComfyUI's minimum inference reserve); ``None`` frees all it
    can on that device (a stage's activations, the scene LoRA's Adam state and the frozen model's
    working memory are not known in advance). Returns True when ComfyUI was asked; headless or on the CPU it
    does nothing (False). Never raises: a failure is logged and the work goes on.
    """
    import torch

    mm = comfy_module("model_management")
    if mm is None or not hasattr(mm, "free_memory"):
        return False
    if torch.device(device).type == "cpu":
        return False
    try:
        dev = _comfy_device(mm, device)
        reserve = float(mm.minimum_inference_memory()) if hasattr(mm, "minimum_inference_memory") else 0.0
        required = 1e30 if memory_required is None else float(memory_required) + reserve
        mm.free_memory(required, dev)
        return True
    except Exception as e:  # never let memory bookkeeping stop a stage
        import logging

        logging.getLogger("dreamflow").warning("DreamFlow: could not ask ComfyUI to free memory%s (%s: %s)",
                                               f" for {why}" if why else "", type(e).__name__, e)
        return False
