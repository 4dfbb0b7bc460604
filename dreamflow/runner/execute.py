"""Execute a validated API prompt of DreamFlow nodes in dependency order, without ComfyUI.

Mirrors what ComfyUI's executor does for our nodes: instantiate the class, call ``FUNCTION`` with the
inputs (links replaced by the upstream outputs) under ``torch.inference_mode()`` (as ComfyUI 0.3.64's
``execution.py``), accept a tuple or ``{"result": ..., "ui": ...}``.
Display-only core nodes (PreviewImage, Preview3D, ...) are skipped: their results have no terminal
form. Interrupts (Ctrl-C via :class:`dreamflow.hosting.sigint_as_interrupt`) stop between nodes and
inside stages within one update.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from .. import hosting
from ..errors import DreamFlowError, DreamFlowInterrupted
from .defs import NodeDef, describe, is_link


@dataclass
class RunResult:
    """What a headless run produced.

    Attributes:
        order: node ids in the order they ran (display nodes excluded).
        outputs: node id -> tuple of output values (dropped by :func:`run_prompt` unless ``keep_outputs``).
        ui: node id -> the ``ui`` dict an output node returned (e.g. saved file names).
        seconds: node id -> wall time of its call.
        skipped: ids of the display-only nodes that were not run.
    """

    order: List[str] = field(default_factory=list)
    outputs: Dict[str, tuple] = field(default_factory=dict)
    ui: Dict[str, dict] = field(default_factory=dict)
    seconds: Dict[str, float] = field(default_factory=dict)
    skipped: List[str] = field(default_factory=list)


def topological_order(prompt: Dict[str, dict]) -> List[str]:
    """Ids so that every node comes after the nodes it links from; ties in id order (stable logs)."""

    def key(nid: str):
        return (0, int(nid), "") if nid.isdigit() else (1, 0, nid)

    deps = {nid: {str(v[0]) for v in (e.get("inputs") or {}).values() if is_link(v)} for nid, e in prompt.items()}
    for nid, d in deps.items():
        if d - set(prompt):
            raise DreamFlowError(f"node {nid} is linked to node(s) {sorted(d - set(prompt))}, which are not in the "
                                 f"workflow; reconnect its inputs")
    order, done = [], set()
    ready = sorted((n for n, d in deps.items() if not d), key=key)
    while ready:
        nid = ready.pop(0)
        order.append(nid)
        done.add(nid)
        newly = [n for n, d in deps.items() if n not in done and n not in ready and d <= done]
        ready = sorted(ready + newly, key=key)
    if len(order) != len(prompt):
        loop = sorted(set(prompt) - done, key=key)
        raise DreamFlowError(f"the workflow has a cycle through nodes {loop}; remove one of the links between them")
    return order


def run_prompt(prompt: Dict[str, dict], defs: Dict[str, NodeDef], *, workflow: Optional[dict] = None,
               log: Callable[[str], None] = print, keep_outputs: bool = False) -> RunResult:
    """Run every non-display node of a validated ``prompt`` in dependency order.

    Args:
        prompt: API prompt whose widget values are already converted (``validate.validate_prompt``).
        defs: node definitions (``defs.node_defs()``).
        workflow: the UI workflow, passed to nodes that ask for the hidden ``EXTRA_PNGINFO``.
        log: where the one-line progress messages go.
        keep_outputs: keep every node's outputs in the result (tests); by default they are dropped
            at the end so the models they hold are freed.
    Raises:
        DreamFlowError from a node, prefixed with the node's name; DreamFlowInterrupted on Ctrl-C.
    """
    result = RunResult()
    order = topological_order(prompt)
    runnable = [n for n in order if not defs[prompt[n]["class_type"]].display_only]
    result.skipped = [n for n in order if n not in runnable]
    outputs: Dict[str, tuple] = {}
    try:
        for k, nid in enumerate(runnable, 1):
            entry = prompt[nid]
            d = defs[entry["class_type"]]
            where = describe(nid, d.type, (entry.get("_meta") or {}).get("title"))
            if hosting.interrupt_requested():
                raise DreamFlowInterrupted(f"interrupted before {where}")
            kwargs: Dict[str, Any] = {}
            for name, value in (entry.get("inputs") or {}).items():
                if d.input(name) is None:
                    continue  # ComfyUI ignores inputs a node does not declare
                kwargs[name] = outputs[str(value[0])][value[1]] if is_link(value) else value
            for name, kind in d.hidden.items():
                kwargs[name] = {"PROMPT": prompt, "UNIQUE_ID": nid,
                                "EXTRA_PNGINFO": {"workflow": workflow} if workflow else {}}.get(kind)
            log(f"[{k}/{len(runnable)}] {where}")
            t0 = time.perf_counter()
            try:
                # as ComfyUI's executor: nodes run in inference mode (nodes that train must switch it off)
                with torch.inference_mode():
                    ret = getattr(d.cls(), d.cls.FUNCTION)(**kwargs)
            except DreamFlowError as e:
                raise DreamFlowError(f"{where}: {e}") from e
            result.seconds[nid] = time.perf_counter() - t0
            if isinstance(ret, dict):
                if ret.get("ui"):
                    result.ui[nid] = ret["ui"]
                ret = ret.get("result", ())
            outputs[nid] = tuple(ret or ())
            if len(outputs[nid]) != len(d.return_types):
                raise RuntimeError(f"{where} returned {len(outputs[nid])} values for {len(d.return_types)} outputs")
            result.order.append(nid)
            log(f"      done in {result.seconds[nid]:.1f} s")
    finally:
        if keep_outputs:
            result.outputs = outputs
        else:
            outputs.clear()
            hosting.free_memory()
    return result
