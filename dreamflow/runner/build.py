"""Write the example workflows in ``workflows/`` (ComfyUI UI format, version 0.4) from the node definitions.

    python -m dreamflow.runner.build            # rewrites workflows/*.json and their thumbnails *.jpg

ComfyUI lists a custom node pack's ``workflows/*.json`` as templates (``/workflow_templates``); its frontend
(1.27) titles each by its file name (custom templates carry no other title) and shows ``<name>.jpg`` beside it,
so the files are named as the user should read them ("DreamFlow quick draft.json").

Generating them keeps widget order, ``control_after_generate`` slots and link slots consistent with
the nodes' ``INPUT_TYPES`` (a hand-edited file drifts silently). The layout mimics what ComfyUI's
frontend (1.27, bundled with ComfyUI 0.3.64) saves: nodes list sockets and *linked* widget inputs
only (its ``compressWidgetInputSlots``), ``widgets_values`` hold every widget value in order.

To add a workflow: write a function building it with :class:`WorkflowBuilder` and add it to
:data:`WORKFLOWS` and its thumbnail to :data:`THUMBNAILS`.
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

SD21 = "stable-diffusion-2-1-base"
"""Stable Diffusion 2.1-base (eps-prediction, 512 px; threestudio prolificdreamer's prior
``stabilityai/stable-diffusion-2-1-base``): the diffusers folder in models/diffusers, or found as its single-file
checkpoint ``v2-1_512-ema-pruned.safetensors`` in models/checkpoints (``denoisers.loading.MODEL_ALIASES``)."""
SDXL_REFINER = "stable-diffusion-xl-refiner-1.0"
"""The SDXL 1.0 refiner: diffusers folder, or its single file ``sd_xl_refiner_1.0.safetensors``."""
PAPER_PROMPT = "A corgi standing up drinking boba."
"""From the paper's prompt list (shipped as ``tests/data/seed_prompts.txt``)."""


#: Height of a node's title bar, pixels (LiteGraph ``NODE_TITLE_HEIGHT``); drawn above ``pos``.
TITLE_HEIGHT = 30
#: Vertical gap between stacked nodes, pixels.
GAP = 40
#: Saved (width, height) of display nodes, pixels: PreviewImage shows a turntable batch, Preview3D a 3D view.
#: ComfyUI's own 3D templates save Preview3D at 860 x 770 .. 1040 x 1100; a new Preview3D is only its widget
#: strip (the 42-pixel view of issue 20).
DISPLAY_SIZES = {"PreviewImage": (400.0, 400.0), "Preview3D": (600.0, 600.0)}


def min_node_height(d: NodeDef) -> float:
    """Height a node's sockets and widgets take in ComfyUI's frontend (LiteGraph: slot rows of 20 px side by
    side, widgets of 20 px + 4 px spacing, multiline text boxes ~90 px), with a margin: pixels."""
    rows = len(d.widgets()) + max(len([i for i in d.inputs if not i.is_widget]), len(d.return_types))
    multiline = sum(1 for w in d.widgets() if w.options.get("multiline"))
    return float(46 + 24 * rows + 66 * multiline)


class WorkflowBuilder:
    """Builds a UI-format workflow node by node.

    Example::

        b = WorkflowBuilder(defs)
        sd = b.add("DreamFlowLoadDenoiser", (0, 0), model_name="stable-diffusion-2-1-base")
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
            height: Optional[float] = None, **values: Any) -> int:
        """Add a node with widget ``values`` (others take their defaults); returns its id. The saved height is
        what its widgets and sockets need (:func:`min_node_height`), or ``height`` when given (e.g. room for
        the images or 3D view a display node shows: :data:`DISPLAY_SIZES`)."""
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
        width, auto_height = DISPLAY_SIZES.get(type_name, (width, None))
        need = min_node_height(d)
        height = max(need, float(height if height is not None else auto_height or need))
        node = {
            "id": len(self.nodes) + 1, "type": type_name, "pos": [float(pos[0]), float(pos[1])],
            "size": [float(width), height], "flags": {}, "order": 0, "mode": 0,
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

    def below(self, node_id: int, gap: float = GAP) -> float:
        """The y under node ``node_id`` where another node's title bar clears it by ``gap`` pixels."""
        n = self._node(node_id)
        return n["pos"][1] + n["size"][1] + TITLE_HEIGHT + gap

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

    def _view_offset(self) -> List[float]:
        """Canvas offset that puts the top-left node (title bar included) 40 px inside the view when opened
        (the frontend draws canvas point p at ``(p + offset) * scale``)."""
        x0 = min(n["pos"][0] for n in self.nodes)
        y0 = min(n["pos"][1] - (TITLE_HEIGHT if n["type"] != "MarkdownNote" or n.get("title") else 0)
                 for n in self.nodes)
        return [40.0 - x0, 40.0 - y0]

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
            "extra": {"ds": {"scale": 0.6, "offset": self._view_offset()}, "frontendVersion": "1.27.10"},
            "version": 0.4,
        }


def _pipeline(b: WorkflowBuilder, sd: int, x0: float, nerf_values: dict, extract_values: dict,
              mesh_values: dict, prompt: str, nerf_title: Optional[str] = None) -> Tuple[int, int]:
    """NeRFStage -> ExtractMesh -> MeshStage with a PreviewImage under each; returns (nerf, mesh) node ids. The
    prompt is typed once, in the NeRF stage: the later stages take the one their state carries."""
    nerf = b.add("DreamFlowNeRFStage", (x0, 0), title=nerf_title, prompt=prompt, **nerf_values)
    b.link(sd, "denoiser", nerf, "denoiser")
    b.link(nerf, "preview", b.add("PreviewImage", (x0, b.below(nerf))), "images")
    extract = b.add("DreamFlowExtractMesh", (x0 + 440, 0), **extract_values)
    b.link(nerf, "nerf", extract, "nerf")
    b.link(extract, "preview", b.add("PreviewImage", (x0 + 440, b.below(extract))), "images")
    mesh = b.add("DreamFlowMeshStage", (x0 + 880, 0), **mesh_values)  # the prompt comes with the mesh
    b.link(sd, "denoiser", mesh, "denoiser")
    b.link(extract, "mesh", mesh, "mesh")
    b.link(mesh, "preview", b.add("PreviewImage", (x0 + 880, b.below(mesh))), "images")
    return nerf, mesh


def _save(b: WorkflowBuilder, mesh: int, x: float, prefix: str, texture_size: int = 1024, **values: Any) -> None:
    """SaveGLB with a Preview3D under it (room for the turntable image SaveGLB shows when it renders one)."""
    height = 420.0 if values.get("turntable_views", 0) > 0 else None
    save = b.add("DreamFlowSaveGLB", (x, 0), height=height, filename_prefix=prefix, texture_size=texture_size,
                 **values)
    b.link(mesh, "mesh", save, "mesh")
    b.link(save, "glb_path", b.add("Preview3D", (x, b.below(save))), "model_file")


def _refine(b: WorkflowBuilder, mesh: int, loader_pos: Tuple[float, float], x: float) -> int:
    """SDXL refiner loader + SDXLRefine at the paper's stage-3 settings (1024 px, t 0.3 -> 0, texture only) on
    ``mesh``'s output (its prompt comes with the mesh), with its PreviewImage; returns the refine node's id."""
    refiner = b.add("DreamFlowLoadDenoiser", loader_pos, title="SDXL refiner", model_name=SDXL_REFINER)
    refine = b.add("DreamFlowSDXLRefine", (x, 0), resolution=1024, t_start=0.3, t_end=0.0,
                   refine_geometry=False)
    b.link(refiner, "denoiser", refine, "refiner")
    b.link(mesh, "mesh", refine, "mesh")
    b.link(refine, "preview", b.add("PreviewImage", (x, b.below(refine))), "images")
    return refine


def paper_full(defs: Dict[str, NodeDef]) -> dict:
    """The paper's pipeline at its settings: SD 2.1-base NeRF (256 px, t 1 -> 0.2), mesh (512 px,
    t 0.5 -> 0.1), SDXL refiner (1024 px, t 0.3 -> 0, texture only); other settings are the stages' defaults."""
    b = WorkflowBuilder(defs)
    b.note("**DreamFlow: the paper's pipeline** (Lee, Sohn & Shin, ICLR 2024)\n\n"
           f"Needs SD 2.1-base and the SDXL refiner: the diffusers folders `{SD21}` and `{SDXL_REFINER}` in "
           "`models/diffusers`, or the single files `v2-1_512-ema-pruned.safetensors` and "
           "`sd_xl_refiner_1.0.safetensors` in `models/checkpoints` (either form is found).\n\n"
           "Stage 1 NeRF (256 px, APFO t 1.0 -> 0.2), ExtractMesh, stage 2 mesh (512 px, t 0.5 -> 0.1), "
           "stage 3 SDXL refiner (1024 px, t 0.3 -> 0.0), Save GLB. The NeRF is also saved as a state "
           "(output/dreamflow/corgi_nerf_*.safetensors) to resume or share.", (-440, -260), size=(400, 230))
    sd = b.add("DreamFlowLoadDenoiser", (-440, 0), title="SD 2.1-base", model_name=SD21)
    nerf, mesh = _pipeline(b, sd, 0, dict(resolution=256, t_start=1.0, t_end=0.2), {},
                           dict(resolution=512, t_start=0.5, t_end=0.1), PAPER_PROMPT)
    nerf_preview = next(lk[3] for lk in b.links if lk[1] == nerf and lk[5] == "IMAGE")
    state = b.add("DreamFlowSaveState", (0, b.below(nerf_preview)), filename_prefix="dreamflow/corgi_nerf")
    b.link(nerf, "nerf", state, "nerf")
    refine = _refine(b, mesh, (880, -320), 1320)
    _save(b, refine, 1760, "dreamflow/corgi")
    return b.to_json("paper_full")


def draft(defs: Dict[str, NodeDef]) -> dict:
    """A fast draft: SD 2.1-base only, few updates, small images; minutes instead of hours."""
    b = WorkflowBuilder(defs)
    b.note("**DreamFlow draft**: SD 2.1-base only, few updates and small images to try a prompt quickly "
           f"(the folder `{SD21}` in `models/diffusers` or `v2-1_512-ema-pruned.safetensors` in "
           "`models/checkpoints`). Raise iterations / resolutions, or use the paper workflow, for quality.", (-440, -220), size=(400, 180))
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
    coarse = b.add("DreamFlowNeRFStage", (-440, b.below(sd)), title="Coarse NeRF (shape)", prompt="A corgi.",
                   iterations=1000, t_start=1.0, t_end=0.5)
    b.link(sd, "denoiser", coarse, "denoiser")
    b.link(coarse, "preview", b.add("PreviewImage", (-880, b.below(sd))), "images")
    state = b.add("DreamFlowSaveState", (-440, b.below(coarse)), filename_prefix="dreamflow/corgi_coarse")
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
    prompt = "a red torus"  # the demo's default prompt
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
    _save(b, mesh, 1320, "dreamflow/toy", **values["DreamFlowSaveGLB"])
    return b.to_json("toy_demo")


EXAMPLE_MESH = "toy_mushroom.glb [example]"
"""The toy-world mesh shipped in ``samples/`` (a red mushroom, vertex colours), as Load Mesh lists it."""
TOY_MESH_STAGE = dict(iterations=30, resolution=64, denoise_resolution=64, views_per_update=2, t_start=0.5, t_end=0.1,
                      preview_views=4, preview_resolution=64)
"""The toy demo's mesh-stage settings (``DemoConfig``: 30 updates at 64 px, APFO t 0.5 -> 0.1)."""
TOY_LOAD = dict(mesh_file=EXAMPLE_MESH, color_fit_steps=100, grid_levels=8, grid_log2_size=15)
"""Load Mesh for the toy prior: the demo's small colour field (8 levels, 2^15 entries: fast on a CPU)."""


def _texture_chain(b: WorkflowBuilder, sd: int, load: int, prompt: str, x0: float, mesh_values: dict) -> int:
    """Load Mesh -> MeshStage (texture only) with its PreviewImage; returns the mesh stage's id."""
    stage = b.add("DreamFlowMeshStage", (x0, 0), title="Mesh stage (texture only)", prompt=prompt, texture_only=True,
                  **mesh_values)
    b.link(sd, "denoiser", stage, "denoiser")
    b.link(load, "mesh", stage, "mesh")
    b.link(stage, "preview", b.add("PreviewImage", (x0, b.below(stage))), "images")
    return stage


def texture_mesh(defs: Dict[str, NodeDef]) -> dict:
    """Texture a mesh made elsewhere: Load Mesh -> MeshStage (texture only, SD 2.1-base, 512 px) -> SDXL refiner
    (1024 px, texture only) -> Save GLB -> Preview3D. The geometry is kept bit for bit."""
    b = WorkflowBuilder(defs)
    b.note("**Texture a mesh**: load your GLB / glTF / OBJ / PLY (upload it on Load Mesh), describe it in the "
           "prompts; the mesh stage (SD 2.1-base, 512 px, t 0.5 -> 0.1) and the SDXL refiner (1024 px, t 0.3 -> 0) "
           "paint it without moving a vertex (texture_only / refine_geometry off). The file's own colours are the "
           f"start (keep_colors). Needs `{SD21}` and `{SDXL_REFINER}` in `models/checkpoints`.", (-440, -260),
           size=(400, 230))
    load = b.add("DreamFlowLoadMesh", (-440, 0), mesh_file=EXAMPLE_MESH)
    sd = b.add("DreamFlowLoadDenoiser", (-440, 420), title="SD 2.1-base", model_name=SD21)
    prompt = "A red mushroom with white spots, photorealistic."
    stage = _texture_chain(b, sd, load, prompt, 0, dict(resolution=512, t_start=0.5, t_end=0.1))
    refine = _refine(b, stage, (440, -320), 440)
    _save(b, refine, 880, "dreamflow/textured")
    return b.to_json("texture_mesh")


def texture_mesh_toy(defs: Dict[str, NodeDef]) -> dict:
    """The texture workflow's offline twin: the shipped toy mushroom's texture refined by the toy prior (CPU,
    minutes). The toy prior is an SD model, so SDXL refine is left out; the mesh stage keeps the geometry. The
    prompt names the file's own colours: in this budget the toy prior refines a texture, it does not re-paint one
    (bench/RESULTS.md, "Figures moved from docstrings")."""
    b = WorkflowBuilder(defs)
    b.note("**Texture a mesh, offline**: the shipped toy mushroom (its colours start the colour field) is refined "
           "by the toy prior `dreamflow-toy` ('a red mushroom', 30 updates, geometry frozen by texture_only). Swap "
           "in your own mesh and the SD / SDXL models with the `DreamFlow texture a mesh` workflow.", (-440, -220),
           size=(400, 180))
    load = b.add("DreamFlowLoadMesh", (-440, 0), **TOY_LOAD)
    sd = b.add("DreamFlowLoadDenoiser", (-440, 420), title="Toy prior", model_name="dreamflow-toy")
    stage = _texture_chain(b, sd, load, "a red mushroom", 0, TOY_MESH_STAGE)
    _save(b, stage, 440, "dreamflow/toy_textured", texture_size=256)
    return b.to_json("texture_mesh_toy")


WORKFLOWS: Dict[str, Callable[[Dict[str, NodeDef]], dict]] = {
    "DreamFlow paper pipeline.json": paper_full,
    "DreamFlow quick draft.json": draft,
    "DreamFlow custom stages.json": custom_stages,
    "DreamFlow offline toy demo.json": toy_demo,
    "DreamFlow texture a mesh.json": texture_mesh,
    "DreamFlow texture a mesh offline.json": texture_mesh_toy,
}

EXAMPLE_STAGE = "samples/dreamflow_example_stage"
"""The example custom stage (a custom-node folder of its own; docs/STATES.md)."""


def custom_stage_example(defs: Dict[str, NodeDef]) -> dict:
    """An outside node between two DreamFlow nodes: Load Mesh -> Example Smooth Mesh -> Save GLB -> Preview3D."""
    b = WorkflowBuilder(defs)
    b.note("**A custom stage between DreamFlow nodes**: `DreamFlowExampleSmoothMesh` (from "
           f"`{EXAMPLE_STAGE}`, copy it into `custom_nodes/`) takes a DreamFlow mesh state and returns a new one "
           "(docs/STATES.md). Headless: `python -m dreamflow run samples/dreamflow_custom_stage_example.json "
           f"--nodes {EXAMPLE_STAGE}`.", (-440, -220), size=(400, 180))
    load = b.add("DreamFlowLoadMesh", (-440, 0), **TOY_LOAD)
    smooth = b.add("DreamFlowExampleSmoothMesh", (0, 0), iterations=5, strength=0.5)
    b.link(load, "mesh", smooth, "mesh")
    _save(b, smooth, 440, "dreamflow/smoothed", texture_size=256)
    return b.to_json("custom_stage_example")


EXAMPLE_WORKFLOWS: Dict[str, Callable[[Dict[str, NodeDef]], dict]] = {
    "dreamflow_custom_stage_example.json": custom_stage_example,
}
"""Workflows in ``samples/`` that need the example nodes (``node_defs(custom_nodes=[EXAMPLE_STAGE])``)."""


#: Real renders of DreamFlow's exported GLBs with the toy prior, the source of the template thumbnails:
#: ``bench/glb_fidelity.py``'s grid (64 px cells; per prompt a front and a top view; rows: apfo / sds / vsd x 50 / 100
#: / 200 NeRF updates x seeds 0-2; columns: its 7 prompts in alphabetical order, :data:`_PROMPTS`).
THUMBNAIL_SOURCE = os.path.join("bench", "glb_fidelity_objects.png")
THUMBNAIL_SIZE = 256
_CELL = 64
_BUDGETS = (50, 100, 200)
_SEEDS = 3
_PROMPTS = (("cone", "blue"), ("cube", "red"), ("cylinder", "yellow"), ("mushroom", "red"), ("snowman", "orange"),
            ("sphere", "green"), ("torus", "purple"))


def _cell(shape: str, colour: str, updates: int, seed: int = 0, view: str = "front") -> Tuple[int, int]:
    """(row, column) of an APFO object's view in :data:`THUMBNAIL_SOURCE`."""
    return _BUDGETS.index(updates) * _SEEDS + seed, 2 * _PROMPTS.index((shape, colour)) + ("front", "top").index(view)


#: Thumbnail of each workflow (ComfyUI's template browser shows ``workflows/<name>.jpg``): its caption and the
#: objects it shows (shape, colour, APFO NeRF updates, seed, view).
THUMBNAILS: Dict[str, Tuple[str, List[tuple]]] = {
    "DreamFlow paper pipeline.json": ("3 stages: NeRF, mesh, SDXL", [
        ("cone", "blue", 200, 2, "front"), ("sphere", "green", 200, 0, "front"),
        ("mushroom", "red", 200, 1, "front"), ("torus", "purple", 200, 2, "top")]),
    "DreamFlow quick draft.json": ("quick draft: few updates", [
        ("torus", "purple", 50, 1, "top"), ("torus", "purple", 100, 1, "top"), ("torus", "purple", 200, 1, "top")]),
    "DreamFlow custom stages.json": ("coarse NeRF, then details", [
        ("mushroom", "red", 50, 1, "front"), ("mushroom", "red", 200, 1, "front")]),
    "DreamFlow offline toy demo.json": ("offline toy prior, CPU minutes", [
        ("torus", "purple", 200, 2, "top"), ("cylinder", "yellow", 200, 0, "front"),
        ("sphere", "green", 200, 0, "front"), ("cone", "blue", 200, 2, "front")]),
    "DreamFlow texture a mesh.json": ("texture a mesh, geometry kept", [
        ("mushroom", "red", 200, 1, "front"), ("mushroom", "red", 200, 1, "top")]),
    "DreamFlow texture a mesh offline.json": ("texture a mesh, offline toy", [
        ("mushroom", "red", 200, 2, "front"), ("mushroom", "red", 200, 2, "top")]),
}


def thumbnail(caption: str, objects: List[tuple], source: Optional[str] = None):
    """A THUMBNAIL_SIZE square JPEG-ready PIL image: the objects' renders side by side over a caption."""
    from PIL import Image, ImageDraw, ImageFont

    grid = Image.open(source or os.path.join(pack_root(), THUMBNAIL_SOURCE)).convert("RGB")
    S, band = THUMBNAIL_SIZE, 44
    out = Image.new("RGB", (S, S), "white")
    n = len(objects)
    cols = 2 if n == 4 else n
    rows = -(-n // cols)
    side = min(S // cols, (S - band) // rows)
    for k, obj in enumerate(objects):
        r, c = _cell(*obj)
        m = 4  # the objects fill the middle of their cells
        crop = grid.crop((c * _CELL + m, r * _CELL + m, (c + 1) * _CELL - m, (r + 1) * _CELL - m))
        crop = crop.resize((side, side), Image.LANCZOS)
        x = (S - cols * side) // 2 + (k % cols) * side
        y = (S - band - rows * side) // 2 + (k // cols) * side
        out.paste(crop, (x, y))
    draw = ImageDraw.Draw(out)
    draw.rectangle((0, S - band, S, S), fill=(40, 44, 52))
    for text, size, y in (("DreamFlow", 15, S - band + 4), (caption, 13, S - band + 24)):
        font = ImageFont.load_default(size=size)
        w = draw.textlength(text, font=font)
        draw.text(((S - w) / 2, y), text, fill="white", font=font)
    return out


def render(workflow: dict) -> str:
    """The exact text written to disk (stable key order, one trailing newline)."""
    return json.dumps(workflow, indent=2) + "\n"


def write_all(folder: Optional[str] = None, thumbnails: bool = True) -> List[str]:
    """Write every workflow (and, with ``thumbnails``, its ``.jpg``: needs ``bench/`` and Pillow)."""
    folder = folder or os.path.join(pack_root(), "workflows")
    defs = node_defs()
    written = []
    jobs = [(os.path.join(folder, name), fn, defs) for name, fn in WORKFLOWS.items()]
    example_defs = node_defs(custom_nodes=[os.path.join(pack_root(), EXAMPLE_STAGE)])
    jobs += [(os.path.join(pack_root(), "samples", name), fn, example_defs) for name, fn in EXAMPLE_WORKFLOWS.items()]
    for path, fn, d in jobs:
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(render(fn(d)))
        written.append(path)
        name = os.path.basename(path)
        if thumbnails and name in THUMBNAILS:  # templates only (ComfyUI does not list samples/)
            jpg = os.path.splitext(path)[0] + ".jpg"
            with atomic_path(jpg) as tmp:
                thumbnail(*THUMBNAILS[name]).save(tmp, format="JPEG", quality=85, optimize=True)
            written.append(jpg)
    return written


if __name__ == "__main__":
    for p in write_all():
        print(p)
