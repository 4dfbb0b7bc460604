"""Workflow files -> API prompts, the way ComfyUI's frontend does it (``graphToPrompt``).

Two formats exist:

* **UI** (what "Save" writes, version 0.4): ``nodes`` with ``widgets_values`` (positional values of
  the node's widgets), ``inputs`` (sockets, and widgets converted to links), and
  ``links = [[id, from_node, from_slot, to_node, to_slot, type], ...]``.
* **API** (what "Export (API)" writes and ``/prompt`` takes):
  ``{"<id>": {"class_type": T, "inputs": {name: value | [from_id, from_slot]}, "_meta": {"title": ...}}}``.

The mapping follows ComfyUI_frontend ``src/utils/executionUtil.ts`` and the widget constructors:

1. every widget input of the definition (required, then optional, in ``INPUT_TYPES`` order) takes the
   next value of ``widgets_values``; an INT that carries ``control_after_generate`` (flag, or named
   seed / noise_seed) is followed by that hidden widget's value ("fixed", "randomize", ...), which is
   consumed but not sent (``options.serialize = false``);
2. a widget converted to a link still owns its position in ``widgets_values`` (the frontend keeps the
   widget); the link then overrides the value;
3. links resolve through Reroute nodes and bypassed nodes (mode 4: the input at the same index when
   the types fit, else the first of the target's type); a link that resolves to nothing leaves the
   widget value; a link from a muted node (mode 2) removes the input (ComfyUI then reports it missing);
   PrimitiveNode values are inlined; Note / MarkdownNote are skipped.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

from ..errors import DreamFlowError
from .defs import CONTROL_VALUES, VIRTUAL_NODES, NodeDef, describe, is_link, types_match

MODE_MUTED = 2   # LGraphEventMode.NEVER
MODE_BYPASS = 4  # LGraphEventMode.BYPASS


def load_workflow_file(path: str) -> dict:
    """Read a workflow JSON (UI or API format) through the checked reader: one-line errors."""
    from ..io import read_json_file

    data = read_json_file(path, "workflow file", "re-save it from ComfyUI or use one in workflows/")
    if not isinstance(data, dict):
        raise DreamFlowError(f"workflow file '{path}' holds a {type(data).__name__}, not a workflow object; re-save it from ComfyUI")
    return data


def check_api_prompt(prompt: dict) -> None:
    """An API prompt's shape: ``{id: {"class_type": str, "inputs": {str: value | [id, slot]}, "_meta": {...}}}``.

    Malformed entries (inputs that are not an object, a class_type that is not text, links with a
    non-integer slot) are one-line DreamFlowErrors naming the node.
    """
    for nid, node in prompt.items():
        where = f"node {str(nid)[:40]}"
        if not isinstance(node, dict):
            raise DreamFlowError(f"{where} of the API workflow is a {type(node).__name__}, not an object; re-export it from ComfyUI")
        if not isinstance(node.get("class_type"), str) or not node["class_type"]:
            raise DreamFlowError(f"{where} has class_type {str(node.get('class_type'))[:40]!r}, not a node type name; re-export the workflow")
        inputs = node.get("inputs")
        if inputs is not None and not isinstance(inputs, dict):
            raise DreamFlowError(f"{where} ({node['class_type']}) has 'inputs' that is a {type(inputs).__name__}, not an object "
                                 f"{{name: value}}; re-export the workflow from ComfyUI")
        for name, value in (inputs or {}).items():
            if isinstance(value, (list, tuple)) and not is_link(value):
                raise DreamFlowError(f"{where} ({node['class_type']}) input '{name}' = {str(value)[:40]} is neither a value nor a "
                                     f"link [node_id, output_index]; re-export the workflow from ComfyUI")
            if isinstance(value, dict):
                raise DreamFlowError(f"{where} ({node['class_type']}) input '{name}' is an object, not a value or a link "
                                     f"[node_id, output_index]; re-export the workflow from ComfyUI")
        if node.get("_meta") is not None and not isinstance(node["_meta"], dict):
            raise DreamFlowError(f"{where} ({node['class_type']}) has '_meta' that is not an object; re-export the workflow")


def is_ui_format(data: dict) -> bool:
    return isinstance(data.get("nodes"), list)


def as_api(data: dict, defs: Dict[str, NodeDef]) -> Tuple[Dict[str, dict], Optional[dict]]:
    """``(api_prompt, ui_workflow_or_None)`` for a UI workflow, an API prompt or a ``/prompt`` body."""
    if is_ui_format(data):
        return ui_to_api(data, defs), data
    prompt = data.get("prompt") if isinstance(data.get("prompt"), dict) else data
    if not prompt or not all(isinstance(v, dict) and "class_type" in v for v in prompt.values()):
        raise DreamFlowError(
            "the workflow is neither ComfyUI's UI format (a 'nodes' list) nor its API format ({id: {class_type, inputs}}); "
            "save it from ComfyUI with Save or Export (API)")
    check_api_prompt(prompt)
    out = {}
    for nid, node in prompt.items():
        node = dict(node)
        node["inputs"] = dict(node.get("inputs") or {})
        out[str(nid)] = node
    extra = data.get("extra_data", {}).get("extra_pnginfo", {}) if isinstance(data.get("extra_data"), dict) else {}
    workflow = extra.get("workflow") if isinstance(extra, dict) else None
    return out, workflow if isinstance(workflow, dict) else None


def _links_table(workflow: dict) -> Dict[int, Tuple[Any, int, Any, int, str]]:
    """link id -> (from_node, from_slot, to_node, to_slot, type); accepts array and object links."""
    table = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            table[link["id"]] = (link["origin_id"], int(link["origin_slot"]), link["target_id"],
                                 int(link["target_slot"]), link.get("type", "*"))
        elif isinstance(link, (list, tuple)) and len(link) >= 6:
            table[link[0]] = (link[1], int(link[2]), link[3], int(link[4]), link[5])
        else:
            raise DreamFlowError(f"workflow link {link!r} is malformed (want [id, from_node, from_slot, to_node, to_slot, type]); re-save the workflow from ComfyUI")
    return table


def check_ui_workflow(workflow: dict) -> None:
    """A UI workflow's shape: ``nodes`` a list of objects with a text ``type``, ``inputs`` a list of objects,
    ``widgets_values`` a list or object, ``links`` a list; anything else is a one-line DreamFlowError."""
    if not isinstance(workflow.get("links", []) or [], list):
        raise DreamFlowError("the workflow's 'links' is not a list; re-save the workflow from ComfyUI")
    for node in workflow["nodes"]:
        if not isinstance(node, dict):
            raise DreamFlowError(f"workflow node {str(node)[:60]!r} is a {type(node).__name__}, not an object; re-save the workflow from ComfyUI")
        where = f"workflow node {str(node.get('id'))[:40]}"
        if "type" in node and not isinstance(node["type"], str):
            raise DreamFlowError(f"{where} has a type that is not text ({str(node['type'])[:40]}); re-save the workflow from ComfyUI")
        if not isinstance(node.get("id", 0), (int, str)) or isinstance(node.get("id"), bool):
            raise DreamFlowError(f"{where} has an id that is not a number or text; re-save the workflow from ComfyUI")
        ins = node.get("inputs")
        if ins is not None and (not isinstance(ins, list) or not all(isinstance(i, dict) for i in ins)):
            raise DreamFlowError(f"{where} ({node.get('type')}) has 'inputs' that is not a list of objects; re-save the workflow from ComfyUI")
        values = node.get("widgets_values")
        if values is not None and not isinstance(values, (list, dict)):
            raise DreamFlowError(f"{where} ({node.get('type')}) has 'widgets_values' that is a {type(values).__name__}, not a list; "
                                 f"re-save the workflow from ComfyUI")


def ui_to_api(workflow: dict, defs: Dict[str, NodeDef]) -> Dict[str, dict]:
    """Convert a UI-format workflow to an API prompt (see the module docstring for the rules).

    Raises DreamFlowError (one line, naming the node and the fix) for an unknown node type, a dangling
    link, a missing or misaligned widget value, subgraphs and group nodes.
    """
    if (workflow.get("definitions") or {}).get("subgraphs"):
        raise DreamFlowError("the workflow uses subgraphs, which the headless runner does not expand; "
                             "in ComfyUI select the subgraph node and choose 'Unpack Subgraph', then save again")
    check_ui_workflow(workflow)
    nodes = {}
    for node in workflow["nodes"]:
        if "id" not in node or "type" not in node:
            raise DreamFlowError(f"workflow node {str(node)[:80]} lacks 'id' or 'type'; re-save the workflow from ComfyUI")
        nodes[node["id"]] = node
    links = _links_table(workflow)

    def label(node):
        return describe(node["id"], node["type"], node.get("title"))

    def resolve(link_id, target, input_name, want_type, seen=()):
        """Follow a link as the frontend's ``ExecutableNodeDTO.resolveInput`` does.

        Returns ("link", origin_id, slot), ("value", v) for a PrimitiveNode, or None when nothing
        resolves (the input keeps its widget value, if it has one). Links from muted nodes resolve to
        that node and are dropped afterwards with every link to a node missing from the prompt.
        """
        link = links.get(link_id)
        if link is None:
            raise DreamFlowError(
                f"{label(target)} input '{input_name}' uses link {link_id}, which is not in the workflow's links; "
                f"reconnect the input in ComfyUI (or delete it) and save again")
        origin_id, slot = link[0], link[1]
        origin = nodes.get(origin_id)
        if origin is None:
            raise DreamFlowError(
                f"{label(target)} input '{input_name}' is linked to node {origin_id}, which is not in the workflow "
                f"(dangling link {link_id}); reconnect the input in ComfyUI and save again")
        if origin_id in seen:
            raise DreamFlowError(f"{label(target)} input '{input_name}' loops through nodes {list(seen)}; break the loop")
        if origin["type"] == "PrimitiveNode":  # its value was copied into the target widget (applyToGraph)
            values = origin.get("widgets_values") or []
            if not values:
                raise DreamFlowError(f"{label(origin)} feeding {label(target)} '{input_name}' has no value; set it in ComfyUI")
            return ("value", values[0])
        ins = origin.get("inputs") or []
        if origin["type"] == "Reroute":  # virtual: same slot index through
            pick = slot if slot < len(ins) else None
        elif origin.get("mode") == MODE_BYPASS:
            pick = _bypass_slot(origin, slot, want_type)
        else:
            return ("link", str(origin_id), slot)
        if pick is None or ins[pick].get("link") is None:
            return None
        return resolve(ins[pick]["link"], target, input_name, want_type, seen + (origin_id,))

    prompt: Dict[str, dict] = {}
    for node in workflow["nodes"]:
        ntype, mode = node["type"], node.get("mode", 0)
        if ntype in VIRTUAL_NODES or mode in (MODE_MUTED, MODE_BYPASS):
            continue  # as graphToPrompt: virtual, muted and bypassed nodes are not sent
        d = defs.get(ntype)
        if d is None:
            raise DreamFlowError(
                f"{label(node)} is not a DreamFlow node nor a display node the runner knows "
                f"(PreviewImage, Preview3D, PreviewAny, Note, Reroute); delete it or run the workflow inside ComfyUI")
        inputs: Dict[str, Any] = {}
        values = node.get("widgets_values")
        values = [] if values is None else values
        if isinstance(values, dict):  # some frontends key widget values by name
            for w in d.widgets():
                if w.name in values:
                    inputs[w.name] = values[w.name]
        else:
            i = 0
            for w in d.widgets():
                if i < len(values):
                    inputs[w.name] = values[i]
                i += 1
                if w.has_control and i < len(values):
                    if values[i] not in CONTROL_VALUES:
                        raise DreamFlowError(
                            f"{label(node)} widget values do not line up with its inputs: after '{w.name}' the "
                            f"control_after_generate value ({'/'.join(CONTROL_VALUES)}) was expected, found {values[i]!r}; "
                            f"the node was saved by another version: re-create it in ComfyUI")
                    i += 1
            if i < len(values) and not d.display_only:
                raise DreamFlowError(
                    f"{label(node)} has {len(values)} widget values but its inputs take {i}; the node was saved by "
                    f"another DreamFlow version: re-create it in ComfyUI (or fix widgets_values)")
        for slot in node.get("inputs") or []:
            name = slot.get("name")
            if slot.get("link") is None:
                continue
            if d.input(name) is None:
                if d.display_only:
                    continue
                raise DreamFlowError(
                    f"{label(node)} has a link into input '{name}', which {ntype} does not have; "
                    f"the node was saved by another DreamFlow version: re-create it in ComfyUI")
            src = resolve(slot["link"], node, name, d.input(name).type)
            if src is None:
                continue
            if src[0] == "value":
                inputs[name] = src[1]
            else:
                inputs[name] = [src[1], src[2]]
        missing = [w.name for w in d.widgets() if w.name not in inputs and w.required and not d.display_only]
        if missing:
            n_values = len(values) if isinstance(values, list) else len(values or {})
            raise DreamFlowError(
                f"{label(node)} has no value for widget(s) {missing} (widgets_values holds {n_values}); "
                f"the node was saved by another DreamFlow version: re-create it in ComfyUI or add the values")
        prompt[str(node["id"])] = {"class_type": ntype, "inputs": inputs,
                                   "_meta": {"title": node.get("title") or ntype}}
    # As graphToPrompt: drop inputs whose source node is not in the prompt (muted, virtual)
    for entry in prompt.values():
        for name, value in list(entry["inputs"].items()):
            if is_link(value) and value[0] not in prompt:
                del entry["inputs"][name]
    return prompt


def _bypass_slot(node: dict, slot: int, want_type: str) -> Optional[int]:
    """Input of a bypassed node that stands in for its output ``slot`` (frontend ``#getBypassSlotIndex``):
    the same index when the types fit, else the first input of exactly ``want_type``, else a compatible one."""
    ins = node.get("inputs") or []
    outs = node.get("outputs") or []
    out_type = outs[slot].get("type", "*") if slot < len(outs) else "*"
    if want_type in ("*", ""):
        return (slot if len(ins) > slot else 0) if ins else None
    if slot < len(ins) and types_match(ins[slot].get("type", "*"), out_type) and types_match(ins[slot].get("type", "*"), want_type):
        return slot
    exact = [k for k, x in enumerate(ins) if x.get("type") == want_type]
    if exact:
        return exact[0]
    fits = [k for k, x in enumerate(ins) if types_match(x.get("type", "*"), out_type) and types_match(x.get("type", "*"), want_type)]
    return fits[0] if fits else None

