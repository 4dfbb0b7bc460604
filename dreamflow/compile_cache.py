"""Where ``torch.compile`` keeps its kernels: a folder that survives reboots, so the cold compile is paid once.

PyTorch's inductor writes what it compiles (FX graphs, Triton kernels, autotuning results) under
``TORCHINDUCTOR_CACHE_DIR``, by default ``<tempdir>/torchinductor_<user>`` (``/tmp`` on Linux), which many systems
empty at boot. DreamFlow's fast path compiles the UNet's and the VAE encoder's blocks and the hash grid, and a
first update on an empty cache takes about ten times as long as on a warm one (bench/RESULTS.md run 6, "Cold
compile"). So before its first compile DreamFlow points inductor at ``$XDG_CACHE_HOME/dreamflow/torchinductor``
(default ``~/.cache/dreamflow/torchinductor``; on the order of a gigabyte per model), unless
``TORCHINDUCTOR_CACHE_DIR`` names another folder than torch's default: set it to choose any folder. (Importing
``torch._inductor``, which diffusers and peft do, sets the variable to torch's default, so that value counts as not
chosen. Inductor reads the variable at each cache look-up; kernels another package compiled earlier in the process
are compiled again once, into the new folder.)
"""

from __future__ import annotations

import logging
import os
from typing import Optional

log = logging.getLogger("dreamflow")

#: The variable inductor reads its cache folder from (torch._inductor.runtime.cache_dir_utils.cache_dir).
ENV = "TORCHINDUCTOR_CACHE_DIR"


def default_dir() -> str:
    """``$XDG_CACHE_HOME/dreamflow/torchinductor`` (``~/.cache/dreamflow/torchinductor`` without XDG_CACHE_HOME)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dreamflow", "torchinductor")


def torch_default_dir() -> Optional[str]:
    """torch's own default cache folder (``<tempdir>/torchinductor_<user>``), or None if this torch has none."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir  # a module without torch imports
    except ImportError:
        return None
    return os.path.abspath(default_cache_dir())


def use_persistent_compile_cache() -> Optional[str]:
    """Point inductor's cache at :func:`default_dir` unless ``TORCHINDUCTOR_CACHE_DIR`` names a folder other than
    :func:`torch_default_dir`.

    Returns the folder inductor will use (the one chosen, or ours), or None when ours could not be made (then
    torch's default is kept and a warning says why). Idempotent and cheap."""
    current = os.environ.get(ENV)
    if current and os.path.abspath(current) != torch_default_dir():
        return current
    path = default_dir()
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is not writable")
    except OSError as e:
        log.warning("dreamflow: keeping torch.compile's default cache folder (could not use %s: %s); set %s to a "
                    "writable folder to keep compiled kernels between reboots", path, e, ENV)
        return None
    os.environ[ENV] = path
    log.info("dreamflow: torch.compile caches kernels in %s (set %s to choose another folder)", path, ENV)
    return path
