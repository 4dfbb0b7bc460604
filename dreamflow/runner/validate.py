"""Check an API prompt against the node definitions before any heavy work, and apply ``--set`` edits.

The checks follow ComfyUI 0.3.64's ``execution.validate_inputs``: every required input present;
links point at an existing node's existing output whose type matches (comma-separated union types,
"*" matches all); widget values convert to their type (INT, FLOAT, STRING, BOOLEAN) and lie within
``min`` / ``max``; dropdown values are in their list (except lists filled from this machine's files,
see ``dreamflow.hosting.DYNAMIC_LIST``). Every problem is one line naming the node and the fix.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterable, List

from ..errors import DreamFlowError
from ..node_defs import NodeDef, coerce, describe, is_link, types_match



def _label(nid: str, entry: dict) -> str:
    return describe(nid, entry.get("class_type", "?"), (entry.get("_meta") or {}).get("title"))


def validate_prompt(prompt: Dict[str, dict], defs: Dict[str, NodeDef]) -> Dict[str, dict]:
    """Validate ``prompt`` (API format) and return a copy with widget values converted to their types."""
    out: Dict[str, dict] = {}
    for nid, entry in prompt.items():
        where = _label(nid, entry)
        d = defs.get(entry.get("class_type"))
        if d is None:
            raise DreamFlowError(f"{where} is not a DreamFlow node nor a known display node; delete it or run the workflow inside ComfyUI")
        inputs = dict(entry.get("inputs") or {})
        for inp in d.inputs:
            if inp.name not in inputs:
                if inp.required:
                    how = (f"set it (e.g. --set {nid}.{inp.name}=VALUE)" if inp.takes_value
                           else f"connect a {inp.type} output to it")
                    raise DreamFlowError(f"{where} is missing required input '{inp.name}'; {how}")
                continue
            value = inputs[inp.name]
            if is_link(value):
                src_id, slot = str(value[0]), value[1]
                src = prompt.get(src_id)
                if src is None:
                    raise DreamFlowError(f"{where} input '{inp.name}' is linked to node {src_id}, which is not in the workflow; reconnect it")
                sdef = defs.get(src.get("class_type"))
                if sdef is None:
                    continue  # reported when the loop reaches that node
                if not 0 <= slot < len(sdef.return_types):
                    raise DreamFlowError(
                        f"{where} input '{inp.name}' uses output {slot} of {_label(src_id, src)}, which has "
                        f"{len(sdef.return_types)} output(s); reconnect it")
                got = sdef.return_types[slot]
                if not types_match(got, inp.type):
                    raise DreamFlowError(
                        f"{where} input '{inp.name}' takes {inp.type} but is linked to a {got} output of "
                        f"{_label(src_id, src)}; connect a {inp.type} output instead")
            elif inp.takes_value:
                inputs[inp.name] = coerce(inp, value, where)
            else:
                raise DreamFlowError(f"{where} input '{inp.name}' needs a link from a {inp.type} output, got the value {str(value)[:40]!r}; connect it")
        out[nid] = {**entry, "inputs": inputs}
    check_nodes(out, defs)
    return out


def check_nodes(prompt: Dict[str, dict], defs: Dict[str, NodeDef]) -> None:
    """Every node's own checks (``VALIDATE_INPUTS``, as ComfyUI calls it when a prompt is queued) before any
    node runs: a typo in the last node fails the run at once, not after the stages before it.

    As in ComfyUI, inputs fed by a link are passed as ``None`` (their values are not known yet).
    """
    for nid, entry in prompt.items():
        d = defs.get(entry.get("class_type"))
        check_fn = getattr(d.cls, "VALIDATE_INPUTS", None) if d is not None and d.cls is not None else None
        if check_fn is None:
            continue
        values = entry.get("inputs") or {}
        kwargs = {i.name: (None if is_link(values[i.name]) else values[i.name]) for i in d.inputs if i.name in values}
        ret = check_fn(**kwargs)
        if ret is not True:
            raise DreamFlowError(f"{_label(nid, entry)}: {ret if ret is not False else 'its inputs are invalid'}")


def _parse_value(text: str) -> Any:
    """``--set`` value: JSON when it parses (numbers, true/false, quoted strings), else the raw text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def find_nodes(prompt: Dict[str, dict], key: str) -> List[str]:
    """Node ids addressed by ``key``: an id, else every node whose title or type equals it."""
    if key in prompt:
        return [key]
    return [nid for nid, e in prompt.items()
            if key in ((e.get("_meta") or {}).get("title"), e.get("class_type"))]


def apply_sets(prompt: Dict[str, dict], sets: Iterable[str], defs: Dict[str, NodeDef]) -> List[str]:
    """Apply ``NODE.INPUT=VALUE`` edits in place (NODE: id, title or type; all matches are edited).

    A widget value replaces a link to that input. Returns one description line per edit.
    """
    done = []
    for item in sets:
        key, sep, raw = item.partition("=")
        node_key, dot, name = key.strip().rpartition(".")
        if not sep or not dot or not node_key or not name:
            raise DreamFlowError(f"--set '{item}' is not NODE.INPUT=VALUE; e.g. --set DreamFlowNeRFStage.iterations=10 or --set 4.seed=1")
        ids = find_nodes(prompt, node_key)
        if not ids:
            known = ", ".join(f"{nid}:{(e.get('_meta') or {}).get('title') or e.get('class_type')}" for nid, e in prompt.items())
            raise DreamFlowError(f"--set '{item}': no node has id, title or type '{node_key}'; nodes are: {known}")
        for nid in ids:
            entry = prompt[nid]
            d = defs.get(entry.get("class_type"))
            inp = d.input(name) if d else None
            where = _label(nid, entry)
            if inp is None:
                names = ", ".join(i.name for i in d.inputs) if d else "?"
                raise DreamFlowError(f"--set '{item}': {where} has no input '{name}'; its inputs are: {names}")
            if not inp.takes_value:
                raise DreamFlowError(f"--set '{item}': {where} input '{name}' is a {inp.type} link, not a value; "
                                     f"connect it in the workflow")
            value = raw if inp.type == "STRING" else _parse_value(raw)
            entry.setdefault("inputs", {})[name] = coerce(inp, value, where)
            done.append(f"{where}.{name} = {entry['inputs'][name]!r}")
    return done
