"""The one place that picks fast optional backends: nvdiffrast (rasterizer) and tiny-cuda-nn (hash grid).

Each picker imports its extension once, logs the choice once, and names the install command when
the fast path is missing. Everything has a pure-torch fallback that runs on CPU.
"""

from __future__ import annotations

import glob
import logging
import os
import sys
from functools import lru_cache

import torch

log = logging.getLogger("dreamflow")

NVDIFFRAST_INSTALL = "pip install diffrp-nvdiffrast  (needs CUDA and a compiler; builds on first use)"
TCNN_INSTALL = "pip install git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch"


def _torch_extensions_dirs():
    """Folders where torch's JIT (``torch.utils.cpp_extension``) puts built extensions."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "torch_extensions")
    return [d for d in glob.glob(os.path.join(root, "*", "*")) if os.path.isdir(d)]


@lru_cache(maxsize=None)
def nvdiffrast_torch():
    """``nvdiffrast.torch`` when CUDA is available and it imports, else ``None`` (logged once).

    With torch >= 2.11, the JIT-built plugin of ``diffrp-nvdiffrast`` is only importable once its
    torch-extensions build folder is on ``sys.path``; we add those folders before importing, and
    once more after a first failed import (which triggers the build).
    """
    if not torch.cuda.is_available():
        log.info("dreamflow: rasterizer = torch (no CUDA)")
        return None
    for attempt in range(2):
        for d in _torch_extensions_dirs():
            if d not in sys.path:
                sys.path.append(d)
        try:
            import nvdiffrast.torch as dr  # type: ignore

            dr.RasterizeCudaContext()  # triggers / checks the JIT build
            log.info("dreamflow: rasterizer = nvdiffrast (CUDA)")
            return dr
        except ImportError:
            if attempt == 1:
                break
        except Exception as e:  # build failure etc.
            log.warning("dreamflow: nvdiffrast unusable (%s); using the torch rasterizer. Install: %s", e, NVDIFFRAST_INSTALL)
            return None
    log.warning("dreamflow: nvdiffrast not installed; using the slower torch rasterizer. Install: %s", NVDIFFRAST_INSTALL)
    return None


@lru_cache(maxsize=None)
def tinycudann():
    """``tinycudann`` module when CUDA is available and it imports, else ``None`` (logged once)."""
    if not torch.cuda.is_available():
        return None
    try:
        import tinycudann as tcnn  # type: ignore

        log.info("dreamflow: hash grid = tiny-cuda-nn")
        return tcnn
    except Exception:
        log.info("dreamflow: hash grid = torch (tiny-cuda-nn not installed: %s)", TCNN_INSTALL)
        return None


def pick(name: str, requested: str = "auto") -> str:
    """Resolve a backend request: ``name`` in {"raster", "hashgrid"}, ``requested`` in {"auto", "torch", "cuda"}.

    Returns "cuda" (nvdiffrast / tcnn) or "torch". Asking for "cuda" when it is unavailable is an error.
    """
    from .errors import DreamFlowError

    if requested not in ("auto", "torch", "cuda"):
        raise DreamFlowError(f"backend '{requested}' for {name} is unknown; use one of: auto, torch, cuda")
    if requested == "torch":
        return "torch"
    found = (nvdiffrast_torch() if name == "raster" else tinycudann()) is not None
    if requested == "cuda" and not found:
        hint = NVDIFFRAST_INSTALL if name == "raster" else TCNN_INSTALL
        raise DreamFlowError(f"{name} backend 'cuda' requested but unavailable; install it ({hint}) or use 'auto'")
    return "cuda" if found else "torch"
