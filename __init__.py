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

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
else:
    # Imported as a lone module, not as a package: pytest does so (to look for setup_module) when the checkout's
    # folder name is no Python identifier (e.g. "wt-16"); ComfyUI never does. Load the pack as the runner does.
    from dreamflow.runner.defs import load_node_pack  # noqa: E402

    NODE_CLASS_MAPPINGS = load_node_pack(_ROOT).NODE_CLASS_MAPPINGS
    NODE_DISPLAY_NAME_MAPPINGS = load_node_pack(_ROOT).NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"  # the Load Mesh upload button (web/dreamflow_load_mesh.js)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
