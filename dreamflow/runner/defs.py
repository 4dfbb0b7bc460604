"""Node definitions as the runner sees them: our node pack's classes plus the few core display nodes.

ComfyUI describes a node by its class attributes (``INPUT_TYPES()``, ``RETURN_TYPES``, ...). The
frontend turns some inputs into *widgets* (values typed on the node) and the rest into *sockets*
(links). This module reads those attributes once into :class:`NodeDef` so the converter, the
validator and the executor all apply one rule for "is this input a widget".
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Dict, Optional

from ..errors import DreamFlowError
# the node definitions live on the ground floor (nodes check their own inputs with them); re-exported for the runner
from ..node_defs import (CONTROL_VALUES, WIDGET_TYPES, NodeDef, describe, is_link, node_def,  # noqa: F401
                         types_match)

#: Frontend-only nodes: never sent to the server (ComfyUI's ``isVirtualNode``).
VIRTUAL_NODES = ("Note", "MarkdownNote", "Reroute", "PrimitiveNode")
#: Core nodes that only display a result; the headless runner skips them (inputs from ComfyUI 0.3.64
#: ``nodes.py`` PreviewImage, ``comfy_extras/nodes_load_3d.py`` Preview3D, ``nodes_preview_any.py``).
CORE_DISPLAY_NODES: Dict[str, dict] = {
    "PreviewImage": {"required": {"images": ("IMAGE", {"tooltip": "The images to preview."})}},
    "Preview3D": {"required": {"model_file": ("STRING", {"default": "", "multiline": False})},
                  "optional": {"camera_info": ("LOAD3D_CAMERA", {})}},
    "PreviewAny": {"required": {"source": ("*", {})}},
}

PACK_MODULE = "comfyui_dreamflow_pack"
"""Module name the runner gives the node pack (ComfyUI names it after its folder; any name works)."""


def pack_root() -> str:
    """The repository root: the folder holding the node pack's ``__init__.py`` beside ``dreamflow/``."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_node_pack(root: Optional[str] = None):
    """Import the node pack (repo-root ``__init__.py``) the way ComfyUI does: by file, as a package.

    Returns the module; its ``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS`` are the pack.
    Importing by file keeps our ``nodes/`` package from ever shadowing ComfyUI's top-level ``nodes``.
    """
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    root = root or pack_root()
    init = os.path.join(root, "__init__.py")
    if not os.path.isfile(init) or not os.path.isdir(os.path.join(root, "nodes")):
        raise DreamFlowError(
            f"the DreamFlow node pack is not at '{root}' (no __init__.py + nodes/); run from a checkout of "
            f"the repository or from ComfyUI/custom_nodes/<this pack>")
    spec = importlib.util.spec_from_file_location(PACK_MODULE, init, submodule_search_locations=[root])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACK_MODULE]
        raise
    return module


def load_custom_nodes(folder: str) -> Dict[str, type]:
    """``NODE_CLASS_MAPPINGS`` of another custom-node folder (e.g. ``samples/dreamflow_example_stage``), imported
    by file as ComfyUI imports ``custom_nodes/*``; for headless runs of workflows with third-party stages."""
    folder = os.path.abspath(folder)
    init = os.path.join(folder, "__init__.py")
    if not os.path.isfile(init):
        raise DreamFlowError(f"custom nodes '{folder}' have no __init__.py; pass a ComfyUI custom-node folder")
    module_name = "dreamflow_custom_nodes_" + "".join(c if c.isalnum() else "_" for c in os.path.basename(folder))
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, init, submodule_search_locations=[folder])
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[module_name]
            raise DreamFlowError(f"custom nodes '{folder}' failed to import ({type(e).__name__}: {e})") from None
    mappings = getattr(sys.modules[module_name], "NODE_CLASS_MAPPINGS", None)
    if not isinstance(mappings, dict):
        raise DreamFlowError(f"custom nodes '{folder}' define no NODE_CLASS_MAPPINGS dict")
    return dict(mappings)


def node_defs(mappings: Optional[Dict[str, type]] = None, custom_nodes=()) -> Dict[str, NodeDef]:
    """Definitions of every node the runner can convert: the pack's nodes, the core display nodes and the nodes
    of the ``custom_nodes`` folders (:func:`load_custom_nodes`)."""
    if mappings is None:
        mappings = load_node_pack().NODE_CLASS_MAPPINGS
    mappings = dict(mappings)
    for folder in custom_nodes:
        mappings.update(load_custom_nodes(folder))
    defs = {name: node_def(name, spec) for name, spec in CORE_DISPLAY_NODES.items()}
    for name, cls in mappings.items():
        defs[name] = node_def(name, cls.INPUT_TYPES(), cls)
    return defs

