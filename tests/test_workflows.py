"""Workflows and the headless runner: the shipped workflows convert and validate against the node definitions,
UI -> API conversion follows ComfyUI's frontend (widget order, control_after_generate, converted widgets,
Reroute / Primitive / bypass / mute), --set edits, one-line errors, execution order, the CLI, and an
end-to-end run of the draft workflow on tiny models.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from dreamflow import hosting
from dreamflow.errors import DreamFlowError, DreamFlowInterrupted
from dreamflow.runner import apply_sets, as_api, node_defs, run_prompt, topological_order, ui_to_api, validate_prompt
from dreamflow.runner.build import WORKFLOWS, render
from dreamflow.runner.defs import node_def, pack_root

REPO = pack_root()
WORKFLOW_DIR = os.path.join(REPO, "workflows")
DEFS = node_defs()


def load(name):
    with open(os.path.join(WORKFLOW_DIR, name), encoding="utf-8") as f:
        return json.load(f)


def by_type(prompt, type_name):
    return {k: v for k, v in prompt.items() if v["class_type"] == type_name}


# ----------------------------------------------------------------------------------------------
# Shipped workflows
# ----------------------------------------------------------------------------------------------
def test_workflow_folder_holds_the_generated_files():
    """The files are what ``python -m dreamflow.runner.build`` writes, up to widget values (those follow the
    engine's defaults at generation time; the validation tests below check them)."""
    assert sorted(os.listdir(WORKFLOW_DIR)) == sorted(list(WORKFLOWS) + [thumb(n) for n in WORKFLOWS])
    for name, build in WORKFLOWS.items():
        fresh, saved = build(DEFS), load(name)
        assert saved["links"] == fresh["links"], f"{name} is stale: run `python -m dreamflow.runner.build`"
        for a, b in zip(saved["nodes"], fresh["nodes"], strict=True):
            assert (a["id"], a["type"], a.get("title"), a["inputs"], a["outputs"]) == \
                (b["id"], b["type"], b.get("title"), b["inputs"], b["outputs"]), name
            assert len(a["widgets_values"]) == len(b["widgets_values"]), f"{name} node {a['id']} is stale"
        assert render(saved) == open(os.path.join(WORKFLOW_DIR, name), encoding="utf-8").read()  # as written


def thumb(name: str) -> str:
    return os.path.splitext(name)[0] + ".jpg"


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_has_a_human_title_and_a_thumbnail(name):
    """ComfyUI 0.3.64 lists a pack's workflows/*.json as templates; its frontend (1.27) titles each by its file
    name and fetches ``<name>.jpg`` beside it (404 -> an empty card). The name reads as a title and is safe in a
    URL path; the thumbnail is a small JPEG cut from real renders of the toy prior's output."""
    from PIL import Image

    from dreamflow.runner.build import THUMBNAIL_SIZE, THUMBNAILS, thumbnail

    title = os.path.splitext(name)[0]
    assert title.startswith("DreamFlow ") and "_" not in title and title == title.strip()
    assert re.fullmatch(r"[A-Za-z0-9 ,()-]+", title), title  # nothing a URL path would need to escape but spaces
    path = os.path.join(WORKFLOW_DIR, thumb(name))
    assert os.path.getsize(path) < 30_000
    with Image.open(path) as im:
        assert im.format == "JPEG" and im.size == (THUMBNAIL_SIZE, THUMBNAIL_SIZE)
        saved = np.asarray(im.convert("RGB"), dtype=np.float32)
    fresh = np.asarray(thumbnail(*THUMBNAILS[name]), dtype=np.float32)
    assert np.abs(saved - fresh).mean() < 3.0, "stale thumbnail: run `python -m dreamflow.runner.build`"
    assert (saved < 200).any(axis=-1).mean() > 0.05  # not a blank card: objects and caption are drawn


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_converts_and_validates(name):
    wf = load(name)
    assert wf["version"] == 0.4 and wf["last_node_id"] == max(n["id"] for n in wf["nodes"])
    assert wf["last_link_id"] == len(wf["links"])
    # every link is listed on both ends, with the slot it names
    nodes = {n["id"]: n for n in wf["nodes"]}
    for lid, src, sslot, dst, dslot, ltype in wf["links"]:
        assert lid in nodes[src]["outputs"][sslot]["links"] and nodes[src]["outputs"][sslot]["type"] == ltype
        assert nodes[dst]["inputs"][dslot]["link"] == lid
    prompt = validate_prompt(ui_to_api(wf, DEFS), DEFS)
    notes = [n for n in wf["nodes"] if n["type"] == "MarkdownNote"]
    assert len(notes) == 1 and len(prompt) == len(wf["nodes"]) - 1
    for nid, entry in prompt.items():
        for inp in DEFS[entry["class_type"]].inputs:
            assert inp.name in entry["inputs"] or not inp.required, (nid, inp.name)
    # every result is shown: each preview goes to a PreviewImage, each GLB to Preview3D
    assert len(by_type(prompt, "PreviewImage")) == sum(
        1 for e in prompt.values() if "IMAGE" in DEFS[e["class_type"]].return_types)
    (p3d,) = by_type(prompt, "Preview3D").values()
    (save_id,) = by_type(prompt, "DreamFlowSaveGLB")
    assert p3d["inputs"]["model_file"] == [save_id, 0]
    for stage in by_type(prompt, "DreamFlowNeRFStage").values():
        assert stage["inputs"]["prompt"].strip()
    # the prompt is typed once: later stages take the one their state carries (empty widget = no override); a
    # mesh loaded from a file carries none, so the stage it feeds is where the prompt is typed
    for kind in ("DreamFlowMeshStage", "DreamFlowSDXLRefine"):
        for stage in by_type(prompt, kind).values():
            if prompt[stage["inputs"]["mesh"][0]]["class_type"] == "DreamFlowLoadMesh":
                assert stage["inputs"]["prompt"].strip()
            else:
                assert stage["inputs"]["prompt"] == ""


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_nodes_have_room_and_do_not_overlap(name):
    """What a user sees on opening a file: every node as tall as its widgets and sockets need, display nodes big
    enough to show their result (Preview3D was saved as a 42-pixel strip), no node covering another (title bars
    included), and the top-left node inside the view."""
    from dreamflow.runner.build import DISPLAY_SIZES, TITLE_HEIGHT, min_node_height

    wf = load(name)
    boxes = []
    for n in wf["nodes"]:
        w, h = n["size"]
        if n["type"] in DEFS:
            assert h >= min_node_height(DEFS[n["type"]]), (n["type"], n["size"])
        if n["type"] == "Preview3D":
            assert w >= 512 and h >= 512, n["size"]
        if n["type"] == "PreviewImage":
            assert w >= 300 and h >= 300, n["size"]
        turntable = [w.name for w in DEFS["DreamFlowSaveGLB"].widgets()].index("turntable_views")
        if n["type"] == "DreamFlowSaveGLB" and n["widgets_values"][turntable] > 0:  # shows its turntable image
            assert h >= min_node_height(DEFS[n["type"]]) + 200, n["size"]
        boxes.append((n["id"], n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["pos"][0] + w, n["pos"][1] + h))
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[3] <= b[1] or b[3] <= a[1] or a[4] <= b[2] or b[4] <= a[2], f"nodes {a[0]} and {b[0]} overlap"
    ox, oy = wf["extra"]["ds"]["offset"]
    assert min(x for _, x, *_ in boxes) + ox >= 0 and min(y for _, _, y, *_ in boxes) + oy >= 0
    assert set(DISPLAY_SIZES) <= {n["type"] for n in wf["nodes"]}


def test_paper_workflow_has_the_paper_settings():
    prompt = validate_prompt(ui_to_api(load("DreamFlow paper pipeline.json"), DEFS), DEFS)
    with open(os.path.join(REPO, "tests", "data", "seed_prompts.txt"), encoding="utf-8") as f:  # the paper's list
        assert "A corgi standing up drinking boba." in f.read().splitlines()
    models = sorted(e["inputs"]["model_name"] for e in by_type(prompt, "DreamFlowLoadDenoiser").values())
    assert models == ["stable-diffusion-2-1-base", "stable-diffusion-xl-refiner-1.0"]
    (nerf,) = by_type(prompt, "DreamFlowNeRFStage").values()
    (mesh,) = by_type(prompt, "DreamFlowMeshStage").values()
    (refine,) = by_type(prompt, "DreamFlowSDXLRefine").values()
    assert (nerf["inputs"]["resolution"], nerf["inputs"]["t_start"], nerf["inputs"]["t_end"]) == (256, 1.0, 0.2)
    assert (mesh["inputs"]["resolution"], mesh["inputs"]["t_start"], mesh["inputs"]["t_end"]) == (512, 0.5, 0.1)
    assert (refine["inputs"]["resolution"], refine["inputs"]["t_start"], refine["inputs"]["t_end"]) == (1024, 0.3, 0.0)
    assert nerf["inputs"]["prompt"] == "A corgi standing up drinking boba."
    for stage in (nerf, mesh, refine):
        assert stage["inputs"]["method"] == "apfo"
    assert mesh["inputs"]["prompt"] == refine["inputs"]["prompt"] == ""  # the state's prompt flows on
    refiner_id = next(k for k, e in by_type(prompt, "DreamFlowLoadDenoiser").items()
                      if "xl-refiner" in e["inputs"]["model_name"])
    assert refine["inputs"]["refiner"] == [refiner_id, 0]


def test_workflow_saved_before_the_memory_widget_still_loads():
    """LoadDenoiser's ``memory`` widget came after workflows were saved with 7 loader values: such a workflow
    converts and validates, and its loaders take the "default" preset; saved with "low_vram", the preset arrives."""
    from dreamflow.runner.defs import load_node_pack

    wf = load("DreamFlow paper pipeline.json")
    loaders = [n for n in wf["nodes"] if n["type"] == "DreamFlowLoadDenoiser"]
    assert [n["widgets_values"][-1] for n in loaders] == ["default", "default"]
    for n in loaders:
        n["widgets_values"] = n["widgets_values"][:-1]  # as saved before
    prompt = validate_prompt(ui_to_api(copy.deepcopy(wf), DEFS), DEFS)
    node = load_node_pack().NODE_CLASS_MAPPINGS["DreamFlowLoadDenoiser"]
    for entry in by_type(prompt, "DreamFlowLoadDenoiser").values():
        assert "memory" not in entry["inputs"] and node.build_config(**entry["inputs"]).memory == "default"
    for n in loaders:
        n["widgets_values"].append("low_vram")
    prompt = validate_prompt(ui_to_api(wf, DEFS), DEFS)
    assert {e["inputs"]["memory"] for e in by_type(prompt, "DreamFlowLoadDenoiser").values()} == {"low_vram"}


def test_no_file_depends_on_one_machines_paths():
    """A clean clone runs anywhere: no code, build file or workflow names an absolute path of the machine it was
    made on (run records such as bench/*.json may say where they ran)."""
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    pattern = re.compile(r"(?<![\w.])/(work|home|root|Users|tmp/dreamflow)/")
    for name in out.stdout.splitlines():
        if name.endswith((".py", ".toml", ".cfg", ".sh")) or name == "Makefile" or name.startswith("workflows/"):
            path = os.path.join(REPO, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8", errors="replace") as f:
                    hits = [ln for ln in f.read().splitlines() if pattern.search(ln)]
                assert not hits, f"{name} names a machine-specific path: {hits[0].strip()[:120]}"


def test_workflow_model_names_agree_with_the_readme():
    """Each model a workflow names is the one the README tells users to install: a diffusers folder name whose
    single-file checkpoints are found too (MODEL_ALIASES), or the shipped toy prior."""
    from dreamflow.denoisers import loading

    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    folder_names = {group[0]: group for group in loading.MODEL_ALIASES}
    for name in WORKFLOWS:
        for entry in by_type(ui_to_api(load(name), DEFS), "DreamFlowLoadDenoiser").values():
            model = entry["inputs"]["model_name"]
            assert f"`{model}`" in readme, f"{name} names {model}, which README.md does not mention"
            if model in folder_names:
                assert f"`{folder_names[model][1]}`" in readme, f"README.md does not name {model}'s single file"
            else:
                assert os.path.isfile(os.path.join(loading.REPO_MODELS_DIR, model, "model_index.json")), model


def test_custom_stages_workflow_chains_two_nerf_stages():
    prompt = validate_prompt(ui_to_api(load("DreamFlow custom stages.json"), DEFS), DEFS)
    stages = by_type(prompt, "DreamFlowNeRFStage")
    (coarse_id, coarse), = [(k, e) for k, e in stages.items() if "init" not in e["inputs"]]
    (detail,) = [e for e in stages.values() if "init" in e["inputs"]]
    assert detail["inputs"]["init"] == [coarse_id, 0]
    assert coarse["inputs"]["t_end"] == detail["inputs"]["t_start"] == 0.5
    assert coarse["inputs"]["prompt"] != detail["inputs"]["prompt"]
    (saved,) = by_type(prompt, "DreamFlowSaveState").values()
    assert saved["inputs"]["nerf"] == [coarse_id, 0]


def test_toy_workflow_runs_the_demo_settings(monkeypatch):
    """``python -m dreamflow demo`` runs workflows/DreamFlow offline toy demo.json when it exists, else calls the stages
    with ``demo.stage_configs``: both routes must build the same stage configs."""
    import importlib

    from dreamflow import config as cfgio
    from dreamflow.demo import DemoConfig, stage_configs
    from dreamflow.runner.defs import PACK_MODULE

    calls = {}

    class Result:
        def turntable(self, n, r):
            import torch

            return torch.zeros(n, r, r, 3)

    def recorder(name, config_at):
        def fn(*args, **kwargs):
            calls[name] = args[config_at]
            return Result()
        return fn

    for module, fn, at in (("nerf_stage", "run_nerf_stage", 3), ("extract_mesh", "extract_mesh_state", 1),
                           ("mesh_stage", "run_mesh_stage", 4)):
        monkeypatch.setattr(importlib.import_module(f"{PACK_MODULE}.nodes.{module}"), fn, recorder(fn, at))
    prompt = validate_prompt(ui_to_api(load("DreamFlow offline toy demo.json"), DEFS), DEFS)
    (loader,) = by_type(prompt, "DreamFlowLoadDenoiser").values()
    assert loader["inputs"]["model_name"] == DemoConfig().model == "dreamflow-toy"
    # no model and no export here: only the stage configs are compared
    monkeypatch.setattr(importlib.import_module(f"{PACK_MODULE}.nodes.load_denoiser"), "load_shared", lambda *a: object())
    for nid in [k for k, v in prompt.items() if v["class_type"] in ("DreamFlowSaveGLB", "Preview3D")]:
        del prompt[nid]
    nerf_cfg, extract_cfg, mesh_cfg = stage_configs(DemoConfig())
    run_prompt(prompt, DEFS, log=lambda s: None)
    assert cfgio.to_dict(calls["run_nerf_stage"]) == cfgio.to_dict(nerf_cfg)
    assert cfgio.to_dict(calls["extract_mesh_state"]) == cfgio.to_dict(extract_cfg)
    assert cfgio.to_dict(calls["run_mesh_stage"]) == cfgio.to_dict(mesh_cfg)
    (save,) = by_type(validate_prompt(ui_to_api(load("DreamFlow offline toy demo.json"), DEFS), DEFS), "DreamFlowSaveGLB").values()
    assert (save["inputs"]["texture_size"], save["inputs"]["turntable_views"], save["inputs"]["turntable_resolution"]) == \
        (DemoConfig().texture_size, DemoConfig().turntable_views, DemoConfig().turntable_resolution)


def test_draft_workflow_is_small():
    prompt = validate_prompt(ui_to_api(load("DreamFlow quick draft.json"), DEFS), DEFS)
    assert not by_type(prompt, "DreamFlowSDXLRefine")
    (nerf,) = by_type(prompt, "DreamFlowNeRFStage").values()
    assert nerf["inputs"]["iterations"] <= 500 and nerf["inputs"]["resolution"] <= 128


# ----------------------------------------------------------------------------------------------
# UI -> API as ComfyUI's frontend does it
# ----------------------------------------------------------------------------------------------
class KSamplerLike:
    """ComfyUI 0.3.64 nodes.py KSampler's inputs (the reference for widget order + control_after_generate)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",), "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 64 - 1, "control_after_generate": True}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000}), "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0}),
            "sampler_name": (["euler", "dpmpp_2m"],), "scheduler": (["normal", "karras"],),
            "positive": ("CONDITIONING",), "negative": ("CONDITIONING",), "latent_image": ("LATENT",),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"


class Source:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"noise_seed": ("INT", {"default": 0, "min": 0, "max": 100}),  # flag-less: named rule
                             "text": ("STRING", {"default": ""}),
                             "n": ("INT", {"default": 1, "min": 0, "max": 100, "forceInput": True})}}

    RETURN_TYPES = ("INT", "STRING")
    RETURN_NAMES = ("INT", "STRING")
    FUNCTION = "run"

    def run(self, noise_seed, text, n):
        return (noise_seed + n, text + "!")


class Sink:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 5, "min": 0, "max": 100}), "label": ("STRING", {"default": ""})},
                "optional": {"seed": ("INT", {"default": 0, "min": 0, "max": 100, "control_after_generate": False})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"
    OUTPUT_NODE = True

    def run(self, value, label, seed=None):
        return {"ui": {"text": [f"{label}={value}"]}, "result": (f"{label}={value}/{seed}",)}


TEST_DEFS = {**DEFS, **{n: node_def(n, c.INPUT_TYPES(), c) for n, c in
                         (("KSampler", KSamplerLike), ("Source", Source), ("Sink", Sink))}}


def ui_node(nid, type_name, values, inputs=(), mode=0, title=None, outputs=()):
    n = {"id": nid, "type": type_name, "mode": mode, "inputs": list(inputs), "outputs": list(outputs),
         "widgets_values": values}
    if title:
        n["title"] = title
    return n


def test_ksampler_template_values_map_like_the_frontend():
    """widgets_values of ComfyUI's own template (3d_hunyuan3d_image_to_model.json, KSampler node 3)."""
    wf = {"nodes": [ui_node(3, "KSampler", [242832339647017, "randomize", 20, 8, "euler", "normal", 1])], "links": []}
    api = ui_to_api(wf, TEST_DEFS)
    assert api["3"]["inputs"] == {"seed": 242832339647017, "steps": 20, "cfg": 8, "sampler_name": "euler",
                                  "scheduler": "normal", "denoise": 1}
    assert api["3"]["class_type"] == "KSampler" and api["3"]["_meta"]["title"] == "KSampler"


def test_named_seed_rule_links_primitives_reroutes_bypass_and_mute():
    wf = {"nodes": [
        # noise_seed has no flag: the name gives it a control slot; 'n' is forceInput (a socket, no value slot)
        ui_node(1, "Source", [7, "fixed", "hi"], inputs=[{"name": "n", "type": "INT", "link": 1}]),
        ui_node(2, "PrimitiveNode", [3], outputs=[{"name": "INT", "type": "INT", "links": [1]}]),
        ui_node(3, "Reroute", [], inputs=[{"name": "", "type": "*", "link": 2}]),
        # Sink.value is a widget converted to a link: it keeps its widget value slot (99) but the link wins;
        # optional 'seed' has control_after_generate False: no control slot after it
        ui_node(4, "Sink", [99, "label", 4], inputs=[{"name": "value", "type": "INT", "widget": {"name": "value"}, "link": 3}],
                title="My sink"),
        ui_node(5, "Sink", [1, "muted", 0], mode=2, outputs=[{"name": "STRING", "type": "STRING", "links": [4]}]),
        ui_node(6, "Sink", [1, "bypassed", 0], mode=4,
                inputs=[{"name": "value", "type": "INT", "widget": {"name": "value"}, "link": 5}]),
        ui_node(7, "Sink", [2, "from bypass", 0], inputs=[{"name": "value", "type": "INT", "widget": {"name": "value"}, "link": 6}]),
        ui_node(8, "Note", ["just text"]),
        ui_node(9, "Sink", [3, "from muted", 0], inputs=[{"name": "label", "type": "STRING", "widget": {"name": "label"}, "link": 4}]),
    ], "links": [[1, 2, 0, 1, 0, "INT"], [2, 1, 0, 3, 0, "INT"], [3, 3, 0, 4, 0, "INT"], [4, 5, 0, 9, 0, "STRING"],
                 [5, 1, 0, 6, 0, "INT"], [6, 6, 0, 7, 0, "INT"]]}
    api = ui_to_api(wf, TEST_DEFS)
    assert sorted(api, key=int) == ["1", "4", "7", "9"]  # primitive, reroute, muted, bypassed, note: gone
    assert api["1"]["inputs"] == {"noise_seed": 7, "text": "hi", "n": 3}
    assert api["4"]["inputs"] == {"value": ["1", 0], "label": "label", "seed": 4}
    assert api["4"]["_meta"]["title"] == "My sink"
    assert api["7"]["inputs"]["value"] == ["1", 0]  # through the bypassed node's same-type input
    # a link from a muted node removes the input, widget value included (graphToPrompt's last pass) ...
    assert api["9"]["inputs"] == {"value": 3, "seed": 0}
    with pytest.raises(DreamFlowError, match="missing required input 'label'"):  # ... as ComfyUI then reports
        validate_prompt(api, TEST_DEFS)


@pytest.mark.parametrize("mutate, message", [
    (lambda wf: wf["nodes"].append(ui_node(9, "SaveImage", ["x"])), "node 9 (SaveImage) is not a DreamFlow node"),
    (lambda wf: wf["links"].pop(), "uses link 1, which is not in the workflow's links"),
    (lambda wf: wf["links"].__setitem__(0, [1, 42, 0, 2, 0, "INT"]), "linked to node 42, which is not in the workflow"),
    (lambda wf: wf["nodes"][1].__setitem__("widgets_values", [1]), "has no value for widget(s) ['label']"),
    (lambda wf: wf["nodes"][1]["widgets_values"].append(1), "has 4 widget values but its inputs take 3"),
    (lambda wf: wf["nodes"][0].__setitem__("widgets_values", [7, "hi", "x"]), "control_after_generate value"),
    (lambda wf: wf.__setitem__("definitions", {"subgraphs": [{}]}), "Unpack Subgraph"),
])
def test_conversion_errors_are_one_line_and_name_the_node(mutate, message):
    wf = {"nodes": [ui_node(1, "Source", [7, "fixed", "hi"]),
                    ui_node(2, "Sink", [1, "label", 0], inputs=[{"name": "value", "type": "INT", "widget": {"name": "value"}, "link": 1}])],
          "links": [[1, 1, 0, 2, 0, "INT"]]}
    ui_to_api(copy.deepcopy(wf), TEST_DEFS)  # the unmutated one converts
    mutate(wf)
    with pytest.raises(DreamFlowError, match=re.escape(message)) as e:
        ui_to_api(wf, TEST_DEFS)
    assert "\n" not in str(e.value)


def test_api_format_and_prompt_body_are_accepted():
    api = ui_to_api(load("DreamFlow quick draft.json"), DEFS)
    again, ui = as_api(json.loads(json.dumps(api)), DEFS)
    assert again == api and ui is None
    body, ui = as_api({"prompt": api, "extra_data": {"extra_pnginfo": {"workflow": {"nodes": []}}}}, DEFS)
    assert body == api and ui == {"nodes": []}
    with pytest.raises(DreamFlowError, match="neither ComfyUI's UI format"):
        as_api({"foo": 1}, DEFS)


# ----------------------------------------------------------------------------------------------
# Validation and --set
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def draft_api():
    return ui_to_api(load("DreamFlow quick draft.json"), DEFS)


def test_set_by_id_title_and_type(draft_api):
    nerf_id = next(iter(by_type(draft_api, "DreamFlowNeRFStage")))
    lines = apply_sets(draft_api, [f"{nerf_id}.iterations=12", "SD 2.1-base.model_name=/tmp/m",
                                   "DreamFlowMeshStage.prompt=123", "DreamFlowNeRFStage.cfg_scale=5",
                                   "DreamFlowLoadDenoiser.cpu_offload=true"], DEFS)
    assert len(lines) == 5
    p = validate_prompt(draft_api, DEFS)
    nerf = p[nerf_id]["inputs"]
    assert nerf["iterations"] == 12 and nerf["cfg_scale"] == 5.0 and isinstance(nerf["cfg_scale"], float)
    (loader,) = by_type(p, "DreamFlowLoadDenoiser").values()
    assert loader["inputs"]["model_name"] == "/tmp/m" and loader["inputs"]["cpu_offload"] is True
    (mesh,) = by_type(p, "DreamFlowMeshStage").values()
    assert mesh["inputs"]["prompt"] == "123"  # a STRING input keeps the text as typed


@pytest.mark.parametrize("item, message", [
    ("DreamFlowNeRFStage.iteratons=3", "has no input 'iteratons'; its inputs are: denoiser"),
    ("DreamFlowNeRFStage.denoiser=3", "is a DREAMFLOW_DENOISER link, not a value"),
    ("NoSuchNode.iterations=3", "no node has id, title or type 'NoSuchNode'"),
    ("DreamFlowNeRFStage.iterations", "is not NODE.INPUT=VALUE"),
    ("DreamFlowNeRFStage.iterations=0", "is below its minimum 1"),
    ("DreamFlowNeRFStage.iterations=2.5", "is not a valid INT"),
    ("DreamFlowNeRFStage.method=ddim", "is not one of: apfo, sds, vsd"),
    ("DreamFlowLoadDenoiser.dtype=fp8", "is not one of: auto, fp16, bf16, fp32"),
    ("DreamFlowNeRFStage.t_start=1.5", "is above its maximum 1.0"),
])
def test_set_errors(draft_api, item, message):
    with pytest.raises(DreamFlowError, match=re.escape(message)):
        apply_sets(draft_api, [item], DEFS)


def test_validation_errors(draft_api):
    nerf_id = next(iter(by_type(draft_api, "DreamFlowNeRFStage")))
    mesh_id = next(iter(by_type(draft_api, "DreamFlowMeshStage")))
    bad = copy.deepcopy(draft_api)
    del bad[nerf_id]["inputs"]["denoiser"]
    with pytest.raises(DreamFlowError, match="missing required input 'denoiser'; connect a DREAMFLOW_DENOISER output"):
        validate_prompt(bad, DEFS)
    bad = copy.deepcopy(draft_api)
    bad[mesh_id]["inputs"]["mesh"] = [nerf_id, 0]  # a NeRF where a mesh is needed
    with pytest.raises(DreamFlowError, match="takes DREAMFLOW_MESH but is linked to a DREAMFLOW_NERF output"):
        validate_prompt(bad, DEFS)
    bad = copy.deepcopy(draft_api)
    bad[mesh_id]["inputs"]["mesh"] = [nerf_id, 5]
    with pytest.raises(DreamFlowError, match="uses output 5 of"):
        validate_prompt(bad, DEFS)
    bad = copy.deepcopy(draft_api)
    bad[nerf_id]["inputs"]["views_per_update"] = "four"
    with pytest.raises(DreamFlowError, match="'four' is not a valid INT"):
        validate_prompt(bad, DEFS)


# ----------------------------------------------------------------------------------------------
# Execution
# ----------------------------------------------------------------------------------------------
def chain_prompt():
    return {
        "10": {"class_type": "Sink", "inputs": {"value": ["2", 0], "label": ["2", 1], "seed": 1}},
        "2": {"class_type": "Source", "inputs": {"noise_seed": 4, "text": "x", "n": 1}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["10", 0]}},
    }


def test_execution_order_outputs_and_display_nodes():
    assert topological_order(chain_prompt()) == ["2", "10", "3"]
    lines = []
    res = run_prompt(validate_prompt(chain_prompt(), TEST_DEFS), TEST_DEFS, log=lines.append, keep_outputs=True)
    assert res.order == ["2", "10"] and res.skipped == ["3"]
    assert res.outputs["2"] == (5, "x!") and res.outputs["10"] == ("x!=5/1",)
    assert res.ui == {"10": {"text": ["x!=5"]}}
    assert lines[0] == "[1/2] node 2 (Source)"


def test_cycles_errors_and_interrupts():
    cyc = {"1": {"class_type": "Sink", "inputs": {"value": ["2", 0]}}, "2": {"class_type": "Source", "inputs": {"n": ["1", 0]}}}
    with pytest.raises(DreamFlowError, match=r"cycle through nodes \['1', '2'\]"):
        topological_order(cyc)
    with pytest.raises(DreamFlowError, match=r"node 1 is linked to node\(s\) \['9'\], which are not in the workflow"):
        topological_order({"1": {"class_type": "Sink", "inputs": {"value": ["9", 0]}}})
    bad = chain_prompt()
    bad["2"]["inputs"]["noise_seed"] = 101
    with pytest.raises(DreamFlowError, match="above its maximum 100"):
        validate_prompt(bad, TEST_DEFS)

    class Failing(Source):
        def run(self, noise_seed, text, n):
            raise DreamFlowError("the prompt is empty; describe the object")

    defs = {**TEST_DEFS, "Source": node_def("Source", Source.INPUT_TYPES(), Failing)}
    with pytest.raises(DreamFlowError, match=r"^node 2 \(Source\): the prompt is empty"):
        run_prompt(validate_prompt(chain_prompt(), defs), defs, log=lambda s: None)
    hosting.request_interrupt()
    try:
        with pytest.raises(DreamFlowInterrupted, match="before node 2"):
            run_prompt(validate_prompt(chain_prompt(), TEST_DEFS), TEST_DEFS, log=lambda s: None)
    finally:
        hosting.clear_interrupt()


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "dreamflow", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": REPO})


def test_cli_dry_run_and_one_line_errors(tmp_path):
    ok = cli("run", "workflows/DreamFlow quick draft.json", "--dry-run", "--set", "DreamFlowNeRFStage.iterations=9")
    assert ok.returncode == 0, ok.stderr
    api = json.loads(ok.stdout[ok.stdout.index("{"):])
    assert next(iter(by_type(api, "DreamFlowNeRFStage").values()))["inputs"]["iterations"] == 9
    wf = load("DreamFlow quick draft.json")
    wf["nodes"][1]["type"] = "SomeoneElsesNode"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(wf))
    for args, message in (((str(path),), "(SomeoneElsesNode) is not a DreamFlow node"),
                          (("workflows/DreamFlow quick draft.json", "--set", "DreamFlowNeRFStage.iterations=0"), "below its minimum 1"),
                          ((str(tmp_path / "missing.json"),), "does not exist")):
        bad = cli("run", *args)
        assert bad.returncode == 2
        assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("dreamflow: error: ") and message in bad.stderr
        assert "Traceback" not in bad.stderr


def test_cli_demo_hook():
    """``demo`` forwards its own options to dreamflow.demo.main (argparse must not claim them)."""
    import importlib.util

    if importlib.util.find_spec("dreamflow.demo") is None:
        res = cli("demo", "--prompt", "a red cube")
        assert res.returncode == 2 and "demo is not part of this version" in res.stderr
    else:
        res = cli("demo", "--help")
        assert res.returncode == 0 and "--prompt" in res.stdout and "python -m dreamflow demo" in res.stdout


# ----------------------------------------------------------------------------------------------
# End to end (needs the whole engine; tiny models, CPU)
# ----------------------------------------------------------------------------------------------
TINY = {"DreamFlowLoadDenoiser.device": "cpu", "DreamFlowLoadDenoiser.dtype": "fp32",
        "DreamFlowNeRFStage.iterations": 2, "DreamFlowNeRFStage.resolution": 16, "DreamFlowNeRFStage.views_per_update": 1,
        "DreamFlowNeRFStage.denoise_resolution": 16, "DreamFlowNeRFStage.preview_views": 2,
        "DreamFlowNeRFStage.preview_resolution": 16, "DreamFlowExtractMesh.resolution": 24,
        "DreamFlowExtractMesh.preview_views": 2, "DreamFlowExtractMesh.preview_resolution": 16,
        "DreamFlowMeshStage.iterations": 2, "DreamFlowMeshStage.resolution": 16, "DreamFlowMeshStage.views_per_update": 1,
        "DreamFlowMeshStage.denoise_resolution": 16, "DreamFlowMeshStage.preview_views": 2,
        "DreamFlowMeshStage.preview_resolution": 16, "DreamFlowSaveGLB.texture_size": 64}


@pytest.mark.e2e
def test_draft_workflow_end_to_end_writes_a_glb(tiny_sd_path, tmp_path):
    import trimesh

    sets = {**TINY, "DreamFlowLoadDenoiser.model_name": tiny_sd_path}
    res = cli("run", "workflows/DreamFlow quick draft.json", "--output", str(tmp_path / "out"),
              *(a for k, v in sets.items() for a in ("--set", f"{k}={v}")), timeout=280)
    assert res.returncode == 0, res.stderr[-3000:]
    saved = [line[len("saved "):] for line in res.stdout.splitlines() if line.startswith("saved ")]
    assert saved == [str(tmp_path / "out" / "dreamflow" / "draft_00001_.glb")]
    scene = trimesh.load(saved[0])
    (geom,) = scene.geometry.values()
    assert len(geom.faces) > 50 and geom.visual.uv.shape == (len(geom.vertices), 2)
    assert geom.visual.material.baseColorTexture.size == (64, 64)


@pytest.mark.e2e
def test_ctrl_c_mid_stage_stops_and_leaves_no_output_file(tiny_sd_path, tmp_path):
    """Ctrl-C during the NeRF stage of a headless run: exit 130 within an update or so, nothing written."""
    import signal
    import time

    sets = {**TINY, "DreamFlowLoadDenoiser.model_name": tiny_sd_path, "DreamFlowNeRFStage.iterations": 100000}
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "dreamflow", "run", "workflows/DreamFlow quick draft.json", "--output",
                             str(out), *(a for k, v in sets.items() for a in ("--set", f"{k}={v}"))],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": REPO, "PYTHONUNBUFFERED": "1"})
    seen = ""
    deadline = time.time() + 200
    while "DreamFlowNeRFStage" not in seen and time.time() < deadline:  # the runner names each node it starts
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
    assert "DreamFlowNeRFStage" in seen, seen[-2000:]
    time.sleep(3)  # well inside the 100,000-update stage
    proc.send_signal(signal.SIGINT)
    try:
        rest, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, (seen + rest)[-2000:]
    assert "interrupted" in rest.lower()
    written = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files] if out.exists() else []
    assert written == []
