"""ComfyUI entry point of the DreamFlow node pack (text-to-3D by approximate probability flow).

ComfyUI imports this file as a package named after its folder. The engine (``dreamflow/``) sits beside
it and is imported as a top-level package, so its folder is put on ``sys.path``: *appended*, so that
ComfyUI's own top-level ``nodes`` module always wins over our ``nodes/`` package. Nothing here imports
ComfyUI; nodes that fail to import are logged and skipped (see ``nodes/__init__.py``).
"""

import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
