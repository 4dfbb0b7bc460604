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
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ..errors import DreamFlowError
from ..hosting import DYNAMIC_LIST

#: Input types the frontend draws as widgets (a list / "COMBO" is a dropdown).
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
#: Values of the hidden widget the frontend adds after a seed (``control_after_generate``).
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
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


@dataclass
class InputDef:
    """One input of a node: a widget (typed value) or a socket (link)."""

    name: str
    type: str
    """"INT" | "FLOAT" | "STRING" | "BOOLEAN" | "COMBO" | a socket type such as "DREAMFLOW_NERF"."""
    options: Dict[str, Any]
    required: bool
    choices: Optional[List[Any]] = None
    """COMBO only: the dropdown's values."""

    @property
    def is_widget(self) -> bool:
        # forceInput turns a widget type into a socket (no widgets_values slot in current frontends)
        return self.type in WIDGET_TYPES and not self.options.get("forceInput", False)

    @property
    def takes_value(self) -> bool:
        """A typed value may be given instead of a link (widgets, and forceInput sockets of widget types)."""
        return self.type in WIDGET_TYPES

    @property
    def has_control(self) -> bool:
        """The frontend adds a hidden ``control_after_generate`` widget after this one.

        Rule of ComfyUI_frontend (``useIntWidget``): ``control_after_generate ?? name in {seed, noise_seed}``
        for INT inputs: an explicit flag wins, else the name decides.
        """
        if self.type != "INT" or not self.is_widget:
            return False
        if "control_after_generate" in self.options:
            return bool(self.options["control_after_generate"])
        return self.name in ("seed", "noise_seed")

    @property
    def dynamic(self) -> bool:
        return bool(self.options.get(DYNAMIC_LIST, False))


@dataclass
class NodeDef:
    """What the runner knows of one node type."""

    type: str
    inputs: List[InputDef]
    """Required inputs, then optional ones, each in ``INPUT_TYPES`` order (the frontend's widget order)."""
    return_types: Tuple[str, ...] = ()
    return_names: Tuple[str, ...] = ()
    output_node: bool = False
    hidden: Dict[str, Any] = field(default_factory=dict)
    cls: Optional[type] = None
    """The node class; ``None`` for core display nodes (skipped headless)."""

    @property
    def display_only(self) -> bool:
        return self.cls is None

    def widgets(self) -> List[InputDef]:
        return [i for i in self.inputs if i.is_widget]

    def input(self, name: str) -> Optional[InputDef]:
        return next((i for i in self.inputs if i.name == name), None)


def _input_def(name: str, spec, required: bool) -> InputDef:
    spec = tuple(spec) if isinstance(spec, (list, tuple)) else (spec,)
    head = spec[0]
    options = dict(spec[1]) if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(head, (list, tuple)):
        return InputDef(name, "COMBO", options, required, list(head))
    if head == "COMBO":
        return InputDef(name, "COMBO", options, required, list(options.get("options", [])))
    return InputDef(name, str(head), options, required)


def node_def(type_name: str, input_types: dict, cls: Optional[type] = None) -> NodeDef:
    """Build a :class:`NodeDef` from an ``INPUT_TYPES()`` dict (and the class, for its outputs)."""
    inputs = [_input_def(n, s, True) for n, s in (input_types.get("required") or {}).items()]
    inputs += [_input_def(n, s, False) for n, s in (input_types.get("optional") or {}).items()]
    return NodeDef(
        type=type_name,
        inputs=inputs,
        return_types=tuple(getattr(cls, "RETURN_TYPES", ()) or ()),
        return_names=tuple(getattr(cls, "RETURN_NAMES", ()) or getattr(cls, "RETURN_TYPES", ()) or ()),
        output_node=bool(getattr(cls, "OUTPUT_NODE", False)),
        hidden=dict(input_types.get("hidden") or {}),
        cls=cls,
    )


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


def node_defs(mappings: Optional[Dict[str, type]] = None) -> Dict[str, NodeDef]:
    """Definitions of every node the runner can convert: the pack's nodes and the core display nodes."""
    if mappings is None:
        mappings = load_node_pack().NODE_CLASS_MAPPINGS
    defs = {name: node_def(name, spec) for name, spec in CORE_DISPLAY_NODES.items()}
    for name, cls in mappings.items():
        defs[name] = node_def(name, cls.INPUT_TYPES(), cls)
    return defs


def is_link(value) -> bool:
    """An API-prompt input that is a link ``[from_node_id, from_slot]`` rather than a value."""
    return (isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[1], int)
            and not isinstance(value[1], bool))


def types_match(received: str, expected: str) -> bool:
    """ComfyUI's link type rule (``comfy_execution/validation.py``, non-strict): "*" or any overlap of
    the comma-separated type sets."""
    if received == expected or "*" in (received, expected):
        return True
    a = {t.strip() for t in str(received).split(",")}
    b = {t.strip() for t in str(expected).split(",")}
    return bool(a & b)


def describe(node_id, type_name: str, title: Optional[str] = None) -> str:
    """How error messages name a node: ``node 4 'Coarse NeRF' (DreamFlowNeRFStage)``."""
    if title and title != type_name:
        return f"node {node_id} '{title}' ({type_name})"
    return f"node {node_id} ({type_name})"
