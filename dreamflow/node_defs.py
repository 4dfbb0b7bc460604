"""Node definitions read from a node class's ``INPUT_TYPES()`` (which inputs are widgets, their types and ranges)
and the one rule that converts and checks a widget value. Ground floor: the nodes' own input checks
(``nodes.common.Checked``) and the headless runner (``dreamflow.runner``) both use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from .errors import DreamFlowError
from .hosting import DYNAMIC_LIST

#: Input types the frontend draws as widgets (a list / "COMBO" is a dropdown).
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
#: Values of the hidden widget the frontend adds after a seed (``control_after_generate``).
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
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


def coerce(inp: InputDef, value: Any, where: str) -> Any:
    """Convert a widget value to its declared type and check its range / list; returns the value."""
    t = inp.type
    try:
        if t == "INT":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = int(value)
        elif t == "FLOAT":
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
        elif t == "BOOLEAN":
            if isinstance(value, str) and value.lower() in ("true", "false"):
                value = value.lower() == "true"
            elif not isinstance(value, bool):
                raise ValueError
        elif t == "STRING":
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            value = str(value)
    except (TypeError, ValueError):
        raise DreamFlowError(f"{where} input '{inp.name}' = {value!r} is not a valid {t}; give a {t.lower()} value") from None
    if t == "FLOAT" and not math.isfinite(value):
        lo, hi = inp.options.get("min"), inp.options.get("max")
        raise DreamFlowError(f"{where} input '{inp.name}' = {value} is not a finite number; use a value in [{lo}, {hi}]")
    if t in ("INT", "FLOAT"):
        lo, hi = inp.options.get("min"), inp.options.get("max")
        if lo is not None and value < lo:
            raise DreamFlowError(f"{where} input '{inp.name}' = {value} is below its minimum {lo}; use a value in [{lo}, {hi}]")
        if hi is not None and value > hi:
            raise DreamFlowError(f"{where} input '{inp.name}' = {value} is above its maximum {hi}; use a value in [{lo}, {hi}]")
    if t == "COMBO":
        if inp.dynamic:
            if not isinstance(value, str) or not value.strip():
                raise DreamFlowError(f"{where} input '{inp.name}' = {value!r} must name a file; pick one of: {', '.join(map(str, inp.choices or [])) or '(none found)'}")
        elif value not in (inp.choices or []):
            raise DreamFlowError(f"{where} input '{inp.name}' = {value!r} is not one of: {', '.join(map(str, inp.choices or []))}")
    return value
