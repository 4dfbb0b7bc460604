"""Write the example workflows in ``workflows/`` (ComfyUI UI format, version 0.4) from the node definitions.

    python -m dreamflow.runner.build            # rewrites workflows/*.json

Generating them keeps widget order, ``control_after_generate`` slots and link slots consistent with
the nodes' ``INPUT_TYPES`` (a hand-edited file drifts silently). The layout mimics what ComfyUI's
frontend (1.27, bundled with ComfyUI 0.3.64) saves: nodes list sockets and *linked* widget inputs
only (its ``compressWidgetInputSlots``), ``widgets_values`` hold every widget value in order.

To add a workflow: write a function building it with :class:`WorkflowBuilder` and add it to
:data:`WORKFLOWS`.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..io import atomic_path
from .defs import NodeDef, node_defs, pack_root

#: Values of widgets the frontend adds to core display nodes (the 3D viewer of Preview3D, as in
#: ComfyUI's own 3D templates: ``"widgets_values": [model_file, ""]``).
FRONTEND_EXTRA_VALUES = {"Preview3D": [""]}

SD21 = "v2-1_512-ema-pruned.safetensors"
"""Stable Diffusion 2.1-base single-file checkpoint (eps-prediction, 512 px; threestudio prolificdreamer's
prior ``stabilityai/stable-diffusion-2-1-base``), in ComfyUI's models/checkpoints."""
SDXL_REFINER = "sd_xl_refiner_1.0.safetensors"
"""The SDXL 1.0 refiner single-file checkpoint, in ComfyUI's models/checkpoints."""
PAPER_PROMPT = "A corgi standing up drinking boba."
"""From the paper's prompt list (/work/shared/seed_prompts.txt)."""


class WorkflowBuilder:
    """Builds a UI-format workflow node by node.

    Example::

        b = WorkflowBuilder(defs)
        sd = b.add("DreamFlowLoadDenoiser", (0, 0), model_name="v2-1_512-ema-pruned.safetensors")
        nerf = b.add("DreamFlowNeRFStage", (400, 0), iterations=300)
        b.link(sd, "denoiser", nerf, "denoiser")
        workflow = b.to_json("my workflow")
    """

    def __init__(self, defs: Dict[str, NodeDef]):
        self.defs = defs
        self.nodes: List[dict] = []
        self.links: List[list] = []

    def _node(self, node_id: int) -> dict:
        return next(n for n in self.nodes if n["id"] == node_id)

    def add(self, type_name: str, pos: Tuple[float, float], title: Optional[str] = None, width: float = 400,
            **values: Any) -> int:
        """Add a node with widget ``values`` (others take their defaults); returns its id."""
        d = self.defs[type_name]
        unknown = set(values) - {w.name for w in d.widgets()}
        if unknown:
            raise ValueError(f"{type_name} has no widget(s) {sorted(unknown)}")
        widgets_values = []
        for w in d.widgets():
            if w.name in values:
                v = values[w.name]
            elif "default" in w.options:
                v = w.options["default"]
            elif w.type == "COMBO" and w.choices:
                v = w.choices[0]
            else:
                raise ValueError(f"{type_name}.{w.name} has no default; give a value")
            widgets_values.append(v)
            if w.has_control:
                widgets_values.append("fixed")  # reproducible runs: the seed stays as saved
        widgets_values += FRONTEND_EXTRA_VALUES.get(type_name, [])
        rows = len(d.widgets()) + max(len([i for i in d.inputs if not i.is_widget]), len(d.return_types))
        multiline = sum(1 for w in d.widgets() if w.options.get("multiline"))
        node = {
            "id": len(self.nodes) + 1, "type": type_name, "pos": [float(pos[0]), float(pos[1])],
            "size": [float(width), float(46 + 24 * rows + 66 * multiline)], "flags": {}, "order": 0, "mode": 0,
            "inputs": [{"name": i.name, "type": i.type, "link": None, **({"shape": 7} if not i.required else {})}
                       for i in d.inputs if not i.is_widget],
            "outputs": [{"name": n, "type": t, "links": []} for n, t in zip(d.return_names, d.return_types)],
            "properties": {"Node name for S&R": type_name},
            "widgets_values": widgets_values,
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node["id"]

    def note(self, text: str, pos: Tuple[float, float], title: str = "Read me", size=(400, 200)) -> int:
        """A MarkdownNote (frontend-only; never executed)."""
        node = {"id": len(self.nodes) + 1, "type": "MarkdownNote", "pos": [float(pos[0]), float(pos[1])],
                "size": [float(size[0]), float(size[1])], "flags": {}, "order": 0, "mode": 0, "inputs": [],
                "outputs": [], "title": title, "properties": {}, "widgets_values": [text],
                "color": "#432", "bgcolor": "#653"}
        self.nodes.append(node)
        return node["id"]

    def link(self, src: int, output: str, dst: int, input_name: str) -> int:
        """Connect output ``output`` (a RETURN_NAME) of ``src`` to input ``input_name`` of ``dst``."""
        s, t = self._node(src), self._node(dst)
        sdef, tdef = self.defs[s["type"]], self.defs[t["type"]]
        slot = list(sdef.return_names).index(output)
        inp = tdef.input(input_name)
        if inp is None:
            raise ValueError(f"{t['type']} has no input {input_name}")
        link_type = sdef.return_types[slot]
        if inp.is_widget:  # a widget converted to an input keeps its widget and gains a socket
            entry = {"name": input_name, "type": inp.type, "widget": {"name": input_name}, "link": None}
            order = [i.name for i in tdef.inputs]
            pos = sum(1 for x in t["inputs"] if order.index(x["name"]) < order.index(input_name))
            t["inputs"].insert(pos, entry)
        link_id = len(self.links) + 1
        target_slot = next(k for k, x in enumerate(t["inputs"]) if x["name"] == input_name)
        t["inputs"][target_slot]["link"] = link_id
        s["outputs"][slot]["links"].append(link_id)
        s["outputs"][slot]["slot_index"] = slot
        self.links.append([link_id, src, slot, dst, target_slot, link_type])
        return link_id

    def to_json(self, name: str) -> dict:
        # execution order as the frontend stores it ("order"): dependencies first
        deps = {n["id"]: {l[1] for l in self.links if l[3] == n["id"]} for n in self.nodes}
        order, done = [], set()
        while len(order) < len(self.nodes):
            nxt = min(i for i, d in deps.items() if i not in done and d <= done)
            order.append(nxt)
            done.add(nxt)
        for k, nid in enumerate(order):
            self._node(nid)["order"] = k
        # link target slots index the final (compressed) inputs lists
        for link in self.links:
            link[4] = next(k for k, x in enumerate(self._node(link[3])["inputs"]) if x["link"] == link[0])
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"dreamflow/workflows/{name}")),
            "revision": 0, "last_node_id": len(self.nodes), "last_link_id": len(self.links),
            "nodes": self.nodes, "links": self.links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.6, "offset": [60.0, 60.0]}, "frontendVersion": "1.27.10"},
            "version": 0.4,
        }


def _pipeline(b: WorkflowBuilder, sd: int, x0: float, nerf_values: dict, extract_values: dict,
              mesh_values: dict, prompt: str, nerf_title: Optional[str] = None) -> Tuple[int, int]:
    """NeRFStage -> ExtractMesh -> MeshStage with a PreviewImage under each; returns (nerf, mesh) node ids. The
    prompt is typed once, in the NeRF stage: the later stages take the one their state carries."""
    nerf = b.add("DreamFlowNeRFStage", (x0, 0), title=nerf_title, prompt=prompt, **nerf_values)
    b.link(sd, "denoiser", nerf, "denoiser")
    b.link(nerf, "preview", b.add("PreviewImage", (x0, 820), width=400), "images")
    extract = b.add("DreamFlowExtractMesh", (x0 + 440, 0), **extract_values)
    b.link(nerf, "nerf", extract, "nerf")
    b.link(extract, "preview", b.add("PreviewImage", (x0 + 440, 820), width=400), "images")
    mesh = b.add("DreamFlowMeshStage", (x0 + 880, 0), **mesh_values)  # the prompt comes with the mesh
    b.link(sd, "denoiser", mesh, "denoiser")
    b.link(extract, "mesh", mesh, "mesh")
    b.link(mesh, "preview", b.add("PreviewImage", (x0 + 880, 820), width=400), "images")
    return nerf, mesh


def _save(b: WorkflowBuilder, mesh: int, x: float, prefix: str, texture_size: int = 1024) -> None:
    save = b.add("DreamFlowSaveGLB", (x, 0), filename_prefix=prefix, texture_size=texture_size)
    b.link(mesh, "mesh", save, "mesh")
    b.link(save, "glb_path", b.add("Preview3D", (x, 200), width=500), "model_file")


def paper_full(defs: Dict[str, NodeDef]) -> dict:
    """The paper's pipeline at its settings: SD 2.1-base NeRF (256 px, t 1 -> 0.2), mesh (512 px,
    t 0.5 -> 0.1), SDXL refiner (1024 px, t 0.3 -> 0, texture only); other settings are the stages' defaults."""
    b = WorkflowBuilder(defs)
    b.note("**DreamFlow: the paper's pipeline** (Lee, Sohn & Shin, ICLR 2024)\n\n"
           f"Needs `{SD21}` (SD 2.1-base) and `{SDXL_REFINER}` in `models/checkpoints`.\n\n"
           "Stage 1 NeRF (256 px, APFO t 1.0 -> 0.2), ExtractMesh, stage 2 mesh (512 px, t 0.5 -> 0.1), "
           "stage 3 SDXL refiner (1024 px, t 0.3 -> 0.0), Save GLB. The NeRF is also saved as a state "
           "(output/dreamflow/corgi_nerf_*.safetensors) to resume or share.", (-440, -260), size=(400, 230))
    sd = b.add("DreamFlowLoadDenoiser", (-440, 0), title="SD 2.1-base", model_name=SD21)
    nerf, mesh = _pipeline(b, sd, 0, dict(resolution=256, t_start=1.0, t_end=0.2), {},
                           dict(resolution=512, t_start=0.5, t_end=0.1), PAPER_PROMPT)
    state = b.add("DreamFlowSaveState", (0, 1160), filename_prefix="dreamflow/corgi_nerf")
    b.link(nerf, "nerf", state, "nerf")
    refiner = b.add("DreamFlowLoadDenoiser", (880, -260), title="SDXL refiner", model_name=SDXL_REFINER)
    refine = b.add("DreamFlowSDXLRefine", (1320, 0), resolution=1024, t_start=0.3, t_end=0.0,
                   refine_geometry=False)
    b.link(refiner, "denoiser", refine, "refiner")
    b.link(mesh, "mesh", refine, "mesh")
    b.link(refine, "preview", b.add("PreviewImage", (1320, 820), width=400), "images")
    _save(b, refine, 1760, "dreamflow/corgi")
    return b.to_json("paper_full")


def draft(defs: Dict[str, NodeDef]) -> dict:
    """A fast draft: SD 2.1-base only, few updates, small images; minutes instead of hours."""
    b = WorkflowBuilder(defs)
    b.note("**DreamFlow draft**: SD 2.1-base only, few updates and small images to try a prompt quickly "
           f"(`{SD21}` in `models/checkpoints`). Raise iterations / resolutions, or use the paper workflow, "
           "for quality.", (-440, -220), size=(400, 180))
    sd = b.add("DreamFlowLoadDenoiser", (-440, 0), title="SD 2.1-base", model_name=SD21)
    _, mesh = _pipeline(
        b, sd, 0,
        nerf_values=dict(iterations=400, resolution=64, views_per_update=2, preview_views=4, preview_resolution=128),
        extract_values=dict(resolution=128, face_budget=20000, preview_views=4, preview_resolution=128),
        mesh_values=dict(iterations=200, resolution=256, views_per_update=2, preview_views=4, preview_resolution=128),
        prompt=PAPER_PROMPT)
    _save(b, mesh, 1320, "dreamflow/draft", texture_size=512)
    return b.to_json("draft")


def custom_stages(defs: Dict[str, NodeDef]) -> dict:
    """Two NeRF stages with different prompts and schedules: a coarse shape first (t 1.0 -> 0.5, short
    prompt), then details (t 0.5 -> 0.2, full prompt) continuing from it; the coarse NeRF is saved."""
    b = WorkflowBuilder(defs)
    b.note("**Custom stages**: a coarse NeRF stage with a short prompt and the high-noise half of the "
           "schedule (t 1.0 -> 0.5), then a second NeRF stage continuing from it (init) with the full prompt "
           "and t 0.5 -> 0.2. The coarse NeRF is saved as a state: load it with DreamFlow Load State to try "
           "other second stages, or insert your own stage between them.", (-440, -260), size=(400, 230))
    sd = b.add("DreamFlowLoadDenoiser", (-440, 0), title="SD 2.1-base", model_name=SD21)
    coarse = b.add("DreamFlowNeRFStage", (-440, 420), title="Coarse NeRF (shape)", prompt="A corgi.",
                   iterations=1000, t_start=1.0, t_end=0.5)
    b.link(sd, "denoiser", coarse, "denoiser")
    b.link(coarse, "preview", b.add("PreviewImage", (-880, 420), width=400), "images")
    state = b.add("DreamFlowSaveState", (-440, 1240), filename_prefix="dreamflow/corgi_coarse")
    b.link(coarse, "nerf", state, "nerf")
    nerf, mesh = _pipeline(b, sd, 0, dict(iterations=1500, t_start=0.5, t_end=0.2), {}, {}, PAPER_PROMPT,
                           nerf_title="Detail NeRF (continues the coarse one)")
    b.link(coarse, "nerf", nerf, "init")
    _save(b, mesh, 1320, "dreamflow/corgi_custom")
    return b.to_json("custom_stages")


def toy_demo(defs: Dict[str, NodeDef]) -> dict:
    """The offline demo on the shipped toy prior ``dreamflow-toy``: the demo's settings, through the one table of
    ``dreamflow.toy.demo_settings`` (``python -m dreamflow demo`` runs this file when it exists)."""
    from ..toy.demo_settings import DemoConfig, widget_values

    c = DemoConfig()
    prompt = "a red cube"
    values = {node: {k: v for k, v in kv.items() if k != "prompt"} for node, kv in widget_values(c, prompt).items()}
    b = WorkflowBuilder(defs)
    b.note("**DreamFlow toy demo**: the shipped toy prior `dreamflow-toy` (64 px, 7 shapes x 6 colours; no "
           "download) runs the whole pipeline on a CPU in minutes. Prompts: 'a <colour> <shape>', e.g. "
           "'a green cone'. Same settings as `python -m dreamflow demo`.", (-440, -220), size=(400, 180))
    sd = b.add("DreamFlowLoadDenoiser", (-440, 0), title="Toy prior", model_name=c.model)
    small = dict(preview_views=4, preview_resolution=64)
    _, mesh = _pipeline(b, sd, 0, nerf_values={**values["DreamFlowNeRFStage"], **small},
                        extract_values={**values["DreamFlowExtractMesh"], **small},
                        mesh_values={**values["DreamFlowMeshStage"], **small}, prompt=prompt)
    save = b.add("DreamFlowSaveGLB", (1320, 0), filename_prefix="dreamflow/toy", **values["DreamFlowSaveGLB"])
    b.link(mesh, "mesh", save, "mesh")
    b.link(save, "glb_path", b.add("Preview3D", (1320, 420), width=500), "model_file")
    return b.to_json("toy_demo")


WORKFLOWS: Dict[str, Callable[[Dict[str, NodeDef]], dict]] = {
    "dreamflow_paper_full.json": paper_full,
    "dreamflow_draft.json": draft,
    "dreamflow_custom_stages.json": custom_stages,
    "dreamflow_toy_demo.json": toy_demo,
}


def render(workflow: dict) -> str:
    """The exact text written to disk (stable key order, one trailing newline)."""
    return json.dumps(workflow, indent=2) + "\n"


def write_all(folder: Optional[str] = None) -> List[str]:
    folder = folder or os.path.join(pack_root(), "workflows")
    defs = node_defs()
    written = []
    for name, fn in WORKFLOWS.items():
        path = os.path.join(folder, name)
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(render(fn(defs)))
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write_all():
        print(p)
