"""The node pack: every node's contract with ComfyUI (V1 API), widgets -> engine configs, validation before
heavy work, interrupts, model sharing, and the file nodes (GLB, states) on tiny real states.

Engine stage calls are replaced by recorders where only the mapping is under test; the file nodes run the
real engine on tiny scenes (2-level hash grids, a box mesh, 64-texel textures).
"""

from __future__ import annotations

import gc
import importlib
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

from dreamflow import hosting
from dreamflow.errors import DreamFlowError, DreamFlowInterrupted
from dreamflow.runner.defs import PACK_MODULE, WIDGET_TYPES, load_node_pack, pack_root

REPO = pack_root()
PACK = load_node_pack()
NODES = PACK.NODE_CLASS_MAPPINGS
NODE_CONFIG = sys.modules[f"{PACK_MODULE}.nodes"].NODE_CONFIG
#: Every attribute ComfyUI 0.3.64 reads from a V1 node class (a misspelt one, e.g. DESCRiPTION, is ignored).
V1_ATTRS = {"INPUT_TYPES", "RETURN_TYPES", "RETURN_NAMES", "OUTPUT_TOOLTIPS", "FUNCTION", "CATEGORY", "DESCRIPTION",
            "OUTPUT_NODE", "IS_CHANGED", "VALIDATE_INPUTS", "OUTPUT_IS_LIST", "INPUT_IS_LIST", "EXPERIMENTAL",
            "DEPRECATED", "SEARCH_ALIASES"}
#: Core types a DreamFlow node may use; everything else must be DREAMFLOW_* (core MESH, MODEL... never).
CORE_OK = set(WIDGET_TYPES) | {"IMAGE", "MESH", "TRIMESH"}
"""Core types (and TRIMESH, the trimesh.Trimesh type 3D packs share) that the converter nodes take and make."""


def node_module(name: str):
    return importlib.import_module(f"{PACK_MODULE}.nodes.{name}")


def all_inputs(cls):
    spec = cls.INPUT_TYPES()
    return {**spec.get("required", {}), **spec.get("optional", {})}, spec


# ----------------------------------------------------------------------------------------------
# Contract with ComfyUI
# ----------------------------------------------------------------------------------------------
def test_every_configured_node_imports():
    assert set(NODES) == set(NODE_CONFIG), sys.modules[f"{PACK_MODULE}.nodes"].UNAVAILABLE
    assert set(PACK.NODE_DISPLAY_NAME_MAPPINGS) == set(NODES)
    assert len(NODES) == 13


@pytest.mark.parametrize("node_id", sorted(NODE_CONFIG))
def test_node_contract(node_id):
    cls = NODES[node_id]
    assert node_id.startswith("DreamFlow") and PACK.NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("DreamFlow ")
    assert cls.CATEGORY.startswith("DreamFlow/")
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 40
    own = {k for k in vars(cls) if k.isupper() or (k[:1].isupper() and "_" in k)}
    assert own <= V1_ATTRS, f"unknown (misspelt?) class attributes {own - V1_ATTRS}"
    inputs, spec = all_inputs(cls)
    assert set(spec) <= {"required", "optional", "hidden"}
    # FUNCTION's parameters are exactly the inputs; optional ones default to None
    params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
    names = [p for p in params if p != "self"]
    assert names == list(spec.get("required", {})) + list(spec.get("optional", {}))
    for name in spec.get("required", {}):
        assert params[name].default is inspect.Parameter.empty, name
    for name in spec.get("optional", {}):
        assert params[name].default is None, name
    # outputs: names, tooltips, types
    n_out = len(cls.RETURN_TYPES)
    assert len(cls.RETURN_NAMES) == n_out and len(cls.OUTPUT_TOOLTIPS) == n_out
    assert all(isinstance(t, str) and len(t) > 10 for t in cls.OUTPUT_TOOLTIPS)
    for name, type_ in zip(cls.RETURN_NAMES, cls.RETURN_TYPES):
        assert type_ in CORE_OK or type_.startswith("DREAMFLOW_"), type_
        assert type_ != "IMAGE" or name == "preview", "IMAGE outputs are only the preview images"
    for name, s in inputs.items():
        opts = s[1] if len(s) > 1 else {}
        assert len(opts.get("tooltip", "")) > 10, f"{node_id}.{name} has no tooltip"
        type_ = s[0]
        if isinstance(type_, list):
            assert opts.get("default", type_[0] if type_ else None) in type_ or opts.get("dreamflow_dynamic")
            continue
        assert type_ in CORE_OK or type_.startswith("DREAMFLOW_"), f"{node_id}.{name}: {type_}"
        assert type_ != "IMAGE"  # stages take states, never images
        if type_ in ("INT", "FLOAT"):
            assert opts["min"] <= opts["default"] <= opts["max"], f"{node_id}.{name}"
        if type_ == "INT" and name == "seed":
            assert opts.get("control_after_generate") is True


def test_output_nodes():
    outputs = {k for k, c in NODES.items() if getattr(c, "OUTPUT_NODE", False)}
    assert outputs == {"DreamFlowSaveGLB", "DreamFlowSaveState"}


def test_types_between_nodes_connect():
    """Every custom type some node takes is produced by some node (no orphan sockets)."""
    produced = {t for c in NODES.values() for t in c.RETURN_TYPES if t.startswith("DREAMFLOW_")}
    consumed = {s[0] for c in NODES.values() for s in all_inputs(c)[0].values()
                if isinstance(s[0], str) and s[0].startswith("DREAMFLOW_")}
    assert consumed == produced == {"DREAMFLOW_DENOISER", "DREAMFLOW_NERF", "DREAMFLOW_MESH"}


def test_widget_defaults_are_the_engine_defaults():
    from dreamflow.stages import ExtractConfig, MeshStageConfig, NeRFStageConfig, RefineConfig

    nerf, _ = all_inputs(NODES["DreamFlowNeRFStage"])
    c = NeRFStageConfig()
    assert nerf["iterations"][1]["default"] == c.iterations == 2500
    assert (nerf["t_start"][1]["default"], nerf["t_end"][1]["default"]) == (c.guidance.t_start, c.guidance.t_end) == (1.0, 0.2)
    assert nerf["lr_lora"][1]["default"] == c.guidance.lora.lr
    mesh, _ = all_inputs(NODES["DreamFlowMeshStage"])
    assert (mesh["t_start"][1]["default"], mesh["t_end"][1]["default"]) == (0.5, 0.1)
    assert mesh["resolution"][1]["default"] == MeshStageConfig().resolution == 512
    refine, _ = all_inputs(NODES["DreamFlowSDXLRefine"])
    assert refine["resolution"][1]["default"] == RefineConfig().resolution == 1024
    assert refine["refine_geometry"][1]["default"] is RefineConfig().optimize_geometry is False
    extract, _ = all_inputs(NODES["DreamFlowExtractMesh"])
    assert extract["face_budget"][1]["default"] == ExtractConfig().face_budget


def test_pack_imports_without_comfy_and_survives_a_broken_node():
    """Importing the pack never imports ComfyUI; a node whose import fails is logged and skipped."""
    code = (
        "import sys, json, logging, io\n"
        "buf = io.StringIO(); logging.basicConfig(stream=buf)\n"
        "sys.modules['dreamflow.export'] = None  # make save_glb's import fail\n"
        "from dreamflow.runner.defs import load_node_pack\n"
        "m = load_node_pack()\n"
        "print(json.dumps({'nodes': sorted(m.NODE_CLASS_MAPPINGS), 'log': buf.getvalue(),\n"
        "                  'comfy': [k for k in sys.modules if k == 'comfy' or k.startswith('comfy.') or k == 'folder_paths']}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert "DreamFlowSaveGLB" not in res["nodes"] and "DreamFlowNeRFStage" in res["nodes"] and len(res["nodes"]) == 12
    assert "DreamFlowSaveGLB is unavailable" in res["log"]
    assert res["comfy"] == []


def test_root_init_keeps_comfy_nodes_module_first():
    """The pack appends (never prepends) its folder to sys.path: ComfyUI's top-level ``nodes`` wins."""
    assert REPO in sys.path
    assert all(p != REPO for p in sys.path[:1])
    src = open(os.path.join(REPO, "__init__.py")).read()
    assert "sys.path.append" in src and "sys.path.insert" not in src


# ----------------------------------------------------------------------------------------------
# Stage nodes: widgets -> config, validation before work, interrupts, memory
# ----------------------------------------------------------------------------------------------
class FakeDenoiser:
    def __init__(self, kind="sd", name="fake"):
        self.kind, self.name, self.device = kind, name, torch.device("cpu")


class FakeState:
    def turntable(self, n, resolution):
        return torch.linspace(0, 1, n * resolution * resolution * 3).reshape(n, resolution, resolution, 3)


def widget_values(node_id, **overrides):
    """Every widget's default (the node's own), with overrides: what a fresh node in ComfyUI sends."""
    inputs, _ = all_inputs(NODES[node_id])
    vals = {k: s[1]["default"] for k, s in inputs.items() if not (isinstance(s[0], str) and s[0].startswith("DREAMFLOW_"))
            and "default" in s[1]}
    vals.update(overrides)
    return vals


@pytest.fixture
def record_stage(monkeypatch):
    """Replace the engine calls of the stage nodes by recorders; returns the list of recorded calls."""
    calls = []

    def recorder(name):
        def fn(*args, callbacks=None, **kwargs):
            calls.append({"fn": name, "args": args, "kwargs": kwargs, "callbacks": callbacks})
            return FakeState()
        return fn

    for module, fn in (("nerf_stage", "run_nerf_stage"), ("mesh_stage", "run_mesh_stage"),
                       ("sdxl_refine", "run_refine_stage"), ("extract_mesh", "extract_mesh_state")):
        monkeypatch.setattr(node_module(module), fn, recorder(fn))
    return calls


def test_nerf_stage_maps_widgets_to_config(record_stage):
    init = object()
    vals = widget_values("DreamFlowNeRFStage", seed=7, iterations=11, resolution=32, denoise_resolution=64,
                         views_per_update=3, method="vsd", cfg_scale=5.0, t_start=0.9, t_end=0.3, updates_per_t=2,
                         lr_grid=0.02, lr_mlp=0.002, lr_lora=3e-4, lambda_sparsity=1.5, lambda_orient=0.5,
                         preview_views=3, preview_resolution=16)
    nerf, preview = NODES["DreamFlowNeRFStage"]().run(denoiser=FakeDenoiser(), init=init, **vals)
    (call,) = record_stage
    den, prompt, negative, config = call["args"]
    assert isinstance(den, FakeDenoiser) and prompt == vals["prompt"] and call["kwargs"]["init"] is init
    assert (config.seed, config.iterations, config.resolution, config.denoise_resolution, config.views_per_update) == (7, 11, 32, 64, 3)
    g = config.guidance
    assert (g.method, g.cfg_scale, g.t_start, g.t_end, g.updates_per_t, g.lora.lr) == ("vsd", 5.0, 0.9, 0.3, 2, 3e-4)
    assert (config.lr_grid, config.lr_mlp, config.lambda_sparsity, config.lambda_orient) == (0.02, 0.002, 1.5, 0.5)
    assert call["callbacks"] is not None and call["callbacks"].should_stop is hosting.interrupt_requested
    assert isinstance(nerf, FakeState)
    assert preview.shape == (3, 16, 16, 3) and preview.dtype == torch.float32 and preview.device.type == "cpu"
    assert torch.equal(preview, FakeState().turntable(3, 16))  # the state's turntable, passed through unchanged


def test_engine_work_runs_with_autograd_inside_comfyui_inference_mode(monkeypatch):
    """ComfyUI executes nodes under torch.inference_mode(); stage and loader work must run with it off."""
    seen = []

    def probe(*a, **k):
        seen.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled(), torch.ones(1).is_inference()))
        return FakeState()

    monkeypatch.setattr(node_module("nerf_stage"), "run_nerf_stage", probe)
    import dreamflow.denoisers as dn

    monkeypatch.setattr(dn.Denoiser, "load", staticmethod(lambda name, **kw: probe() and FakeDenoiser()))
    with torch.inference_mode():
        NODES["DreamFlowNeRFStage"]().run(denoiser=FakeDenoiser(), **widget_values("DreamFlowNeRFStage"))
        NODES["DreamFlowLoadDenoiser"]().load("probe-model", "auto", "cpu", False, False, "graphs+compile", "auto")
    assert seen == [(False, True, False), (False, True, False)]


def test_mesh_and_refine_stages_map_widgets(record_stage):
    mesh_in = object()
    vals = widget_values("DreamFlowMeshStage", iterations=5, lr_geometry=0.01, lambda_laplacian=3.0,
                         lambda_normal_consistency=4.0, t_start=0.45, t_end=0.05)
    NODES["DreamFlowMeshStage"]().run(denoiser=FakeDenoiser(), mesh=mesh_in, **vals)
    vals = widget_values("DreamFlowSDXLRefine", refine_geometry=True, resolution=256, lr_mlp=0.004)
    NODES["DreamFlowSDXLRefine"]().run(refiner=FakeDenoiser("sdxl_refiner"), mesh=mesh_in, **vals)
    m, r = record_stage
    cm, cr = m["args"][4], r["args"][4]
    assert m["args"][1] is mesh_in and r["args"][1] is mesh_in
    assert (cm.iterations, cm.lr_geometry, cm.lambda_laplacian, cm.lambda_normal_consistency) == (5, 0.01, 3.0, 4.0)
    assert (cm.guidance.t_start, cm.guidance.t_end) == (0.45, 0.05)
    assert type(cr).__name__ == "RefineConfig" and cr.optimize_geometry is True
    assert (cr.resolution, cr.lr_mlp, cr.guidance.t_start, cr.guidance.t_end) == (256, 0.004, 0.3, 0.0)


def test_extract_mesh_threshold_negative_means_auto(record_stage):
    nerf = object()
    NODES["DreamFlowExtractMesh"]().extract(nerf, 64, -1.0, 5000, 2, 16)
    NODES["DreamFlowExtractMesh"]().extract(nerf, 64, 12.5, 0, 2, 16)
    auto, fixed = (c["args"][1] for c in record_stage)
    assert (auto.threshold, auto.resolution, auto.face_budget) == ("auto", 64, 5000)
    assert (fixed.threshold, fixed.face_budget) == (12.5, 0)


@pytest.mark.parametrize("change, message", [
    ({"t_start": 0.2, "t_end": 0.2}, "must be greater than t_end"),
    ({"t_start": 0.1, "t_end": 0.5}, "must be greater than t_end"),
    ({"method": "ddim"}, "unknown"),
    ({"iterations": 0}, "iterations=0"),
    ({"lr_grid": -1.0}, "lr_grid=-1.0 must be >= 0"),
])
def test_bad_settings_fail_before_the_engine_runs(record_stage, change, message):
    vals = widget_values("DreamFlowNeRFStage", **change)
    with pytest.raises(DreamFlowError, match=message) as e:
        NODES["DreamFlowNeRFStage"]().run(denoiser=FakeDenoiser(), **vals)
    assert "\n" not in str(e.value)
    assert record_stage == []


def test_engine_checks_prompt_kind_and_state_before_work(monkeypatch, tiny_sd, tiny_refiner):
    """With the real engine functions and tiny denoisers: an empty prompt, the wrong denoiser kind, a state of
    the wrong stage and a denoise size the denoiser cannot take are one-line errors raised before any
    optimisation starts."""
    import dreamflow.stages.mesh_stage as ms
    import dreamflow.stages.nerf_stage as ns

    def no_work(*a, **k):
        raise AssertionError("optimisation started")

    monkeypatch.setattr(ns, "optimise", no_work)
    monkeypatch.setattr(ms, "optimise", no_work)
    nerf = NODES["DreamFlowNeRFStage"]()
    small = dict(denoise_resolution=16, resolution=16)
    with pytest.raises(DreamFlowError, match="prompt is empty"):
        nerf.run(denoiser=tiny_sd, **widget_values("DreamFlowNeRFStage", prompt="  ", **small))
    with pytest.raises(DreamFlowError, match="needs a .*denoiser"):
        nerf.run(denoiser=tiny_refiner, **widget_values("DreamFlowNeRFStage", **small))
    with pytest.raises(DreamFlowError, match="denoise_resolution=18 is not a multiple of"):
        nerf.run(denoiser=tiny_sd, **widget_values("DreamFlowNeRFStage", denoise_resolution=18, resolution=16))
    with pytest.raises(DreamFlowError, match="needs a .*denoiser"):
        NODES["DreamFlowSDXLRefine"]().run(refiner=tiny_sd, mesh=tiny_mesh(), **widget_values("DreamFlowSDXLRefine", **small))
    with pytest.raises(DreamFlowError, match="mesh state"):
        NODES["DreamFlowMeshStage"]().run(denoiser=tiny_sd, mesh="not a mesh", **widget_values("DreamFlowMeshStage", **small))
    with pytest.raises(DreamFlowError, match="NeRF state"):
        NODES["DreamFlowExtractMesh"]().extract("not a nerf", 32, -1.0, 0, 1, 16)


def test_interrupt_propagates_and_memory_is_freed(monkeypatch):
    freed = []
    monkeypatch.setattr(hosting, "free_memory", lambda: freed.append(1))

    def interrupted(*a, **k):  # what the engine's loop does on cancel / Ctrl-C
        hosting.raise_interrupt("NeRFStage interrupted at update 3/10; nothing was written")

    monkeypatch.setattr(node_module("nerf_stage"), "run_nerf_stage", interrupted)
    with pytest.raises(DreamFlowInterrupted):
        NODES["DreamFlowNeRFStage"]().run(denoiser=FakeDenoiser(), **widget_values("DreamFlowNeRFStage"))
    assert freed == [1]

    # hosted: ComfyUI's own interrupt exception reaches ComfyUI untouched (it reports "interrupted")
    class MM:
        class InterruptProcessingException(Exception):
            pass

        @classmethod
        def throw_exception_if_processing_interrupted(cls):
            raise cls.InterruptProcessingException()

    monkeypatch.setattr(hosting, "comfy_module", lambda name: MM if name == "model_management" else None)
    with pytest.raises(MM.InterruptProcessingException):
        NODES["DreamFlowNeRFStage"]().run(denoiser=FakeDenoiser(), **widget_values("DreamFlowNeRFStage"))
    assert freed == [1, 1]


def test_load_denoiser_shares_one_copy_per_settings(monkeypatch):
    import dreamflow.denoisers as dn

    loads = []

    class Loaded:
        def __init__(self, name, kw):
            self.name, self.kw, self.fast = name, kw, []
            self.device = torch.device(kw["device"])

        def enable_fast_path(self, config=None):
            self.fast.append(config.compile)

    def fake_load(name, **kw):
        loads.append((name, kw))
        return Loaded(name, kw)

    monkeypatch.setattr(dn.Denoiser, "load", staticmethod(fake_load))
    node = NODES["DreamFlowLoadDenoiser"]()
    (a,) = node.load("sd21", "auto", "cpu", False, False, "graphs+compile", "auto")
    (b,) = node.load("sd21", "auto", "cpu", False, False, "graphs+compile", "auto")
    (c,) = node.load("sd21", "fp32", "cpu", False, True, "graphs+compile", "bf16")
    assert a is b and c is not a and len(loads) == 2
    assert loads[1][1] == {"dtype": "fp32", "device": "cpu", "cpu_offload": False, "vae_tiling": True,
                           "vae_dtype": "bf16", "memory": "default"}
    assert a.fast == c.fast == []  # the fast path is CUDA-only

    (d,) = node.load("sd21", "auto", "cpu", False, False, "off", "auto")
    assert d is a and len(loads) == 2  # ... so on the CPU it does not split the cache
    del d
    gs = [node.load("sd21", "auto", "cuda", False, False, f, "auto")[0] for f in ("graphs+compile", "graphs", "off")]
    assert [g.fast for g in gs] == [["blocks"], ["off"], []] and len({id(g) for g in gs}) == 3
    with pytest.raises(DreamFlowError, match="fast_path='turbo' is unknown; use one of: graphs\\+compile, graphs, off"):
        node.load("sd21", "auto", "cuda", False, False, "turbo", "auto")
    g, h = gs[0], gs[1]
    del a, b, c, g, h
    gc.collect()  # nobody holds the models: the cache lets them go
    del gs
    gc.collect()
    node.load("sd21", "auto", "cpu", False, False, "graphs+compile", "auto")
    assert len(loads) == 6


def test_load_denoiser_memory_preset_is_a_setting(monkeypatch):
    """``memory`` (the last widget, optional: workflows saved before it load) reaches Denoiser.load, splits the
    shared copies, and an unsaved value means "default"."""
    import dreamflow.denoisers as dn

    loads = []

    class Loaded:
        device = torch.device("cpu")

    monkeypatch.setattr(dn.Denoiser, "load", staticmethod(lambda name, **kw: loads.append(kw) or Loaded()))
    node = NODES["DreamFlowLoadDenoiser"]()
    (a,) = node.load("sd21", "auto", "cpu", False, False, "graphs+compile", "auto")
    (m,) = node.load("sd21", "auto", "cpu", False, False, "graphs+compile", "auto", "low_vram")
    (m2,) = node.load("sd21", "auto", "cpu", False, False, "graphs+compile", "auto", memory="low_vram")
    assert m is m2 and m is not a and [kw["memory"] for kw in loads] == ["default", "low_vram"]
    assert node.load("sd21", "auto", "cpu", False, False, "graphs+compile", "auto", memory=None)[0] is a
    spec = NODES["DreamFlowLoadDenoiser"].INPUT_TYPES()
    assert list(spec["optional"]) == ["memory"] and spec["optional"]["memory"][0] == ["default", "low_vram"]
    assert spec["optional"]["memory"][1]["default"] == "default"
    with pytest.raises(DreamFlowError, match="memory.*'huge' is not one of: default, low_vram"):
        NODES["DreamFlowLoadDenoiser"].check_inputs(model_name="sd21", dtype="auto", device="cpu", cpu_offload=False,
                                                    vae_tiling=False, fast_path="off", vae_precision="auto",
                                                    memory="huge")


def test_load_denoiser_lists_models_and_reports_missing(monkeypatch, tmp_path):
    inputs, _ = all_inputs(NODES["DreamFlowLoadDenoiser"])
    assert inputs["model_name"][1]["dreamflow_dynamic"] is True
    with pytest.raises(DreamFlowError, match="not found"):
        NODES["DreamFlowLoadDenoiser"]().load(str(tmp_path / "no-such-model"), "auto", "cpu", False, False, "graphs+compile", "auto")


# ----------------------------------------------------------------------------------------------
# File nodes on tiny real states
# ----------------------------------------------------------------------------------------------
def tiny_nerf():
    from dreamflow.scene.hashgrid import HashGridConfig
    from dreamflow.scene.nerf import Background, BackgroundConfig, NeRFField, NeRFFieldConfig
    from dreamflow.state import NeRFState

    torch.manual_seed(0)
    grid = HashGridConfig(n_levels=2, log2_hashmap_size=8, base_resolution=4, per_level_scale=2.0, backend="torch")
    return NeRFState(field=NeRFField(NeRFFieldConfig(grid=grid, mlp_width=8)),
                     background=Background(BackgroundConfig(mlp_width=8)), prompt="a red cube")


def tiny_mesh():
    from dreamflow.scene.mesh import box_mesh
    from dreamflow.state import MeshState

    n = tiny_nerf()
    v, f = box_mesh(0.5)
    return MeshState(field=n.field, background=n.background, prompt="a red cube", vertices=v.float(), faces=f.long())


@pytest.fixture
def folders(tmp_path, monkeypatch):
    out, inp = tmp_path / "output", tmp_path / "input"
    monkeypatch.setenv("DREAMFLOW_OUTPUT", str(out))
    monkeypatch.setenv("DREAMFLOW_INPUT", str(inp))
    return out, inp


def test_save_glb_writes_numbered_loadable_files(folders):
    import trimesh

    out, _ = folders
    mesh = tiny_mesh()
    node = NODES["DreamFlowSaveGLB"]()
    r1 = node.save(mesh, "dreamflow/cube", 64, 0, 64)
    r2 = node.save(mesh, "dreamflow/cube", 64, 2, 32)
    assert r1["result"] == ("dreamflow/cube_00001_.glb",) and r2["result"] == ("dreamflow/cube_00002_.glb",)
    assert r1["ui"] == {"3d": [{"filename": "cube_00001_.glb", "subfolder": "dreamflow", "type": "output"}]}
    (png,) = r2["ui"]["images"]  # the textured turntable, shown on the node
    assert png["subfolder"] == "dreamflow" and png["type"] == "output"
    from PIL import Image

    with Image.open(out / "dreamflow" / png["filename"]) as im:
        assert im.size == (2 * 32, 32)  # one row of 2 views
    scene = trimesh.load(str(out / "dreamflow" / "cube_00001_.glb"))
    geom = list(scene.geometry.values())[0]
    assert len(geom.faces) == 12 and geom.visual.material.baseColorTexture.size == (64, 64)
    with pytest.raises(DreamFlowError, match="'..'"):
        node.save(mesh, "../escape", 64, 0, 64)
    with pytest.raises(DreamFlowError, match="MeshState"):
        node.save(tiny_nerf(), "dreamflow/cube", 64, 0, 64)


def test_state_round_trip_through_save_and_load_nodes(folders):
    from dreamflow.state import NoState

    out, inp = folders
    nerf, mesh = tiny_nerf(), tiny_mesh()
    save, load = NODES["DreamFlowSaveState"](), NODES["DreamFlowLoadState"]
    (nerf_rel,) = save.save("dreamflow/state", nerf=nerf)["result"]
    (mesh_rel,) = save.save("dreamflow/state", mesh=mesh)["result"]
    assert (nerf_rel, mesh_rel) == ("dreamflow/state_00001_.safetensors", "dreamflow/state_00002_.safetensors")
    # a state copied into input/, and a foreign safetensors file that must not be listed
    os.makedirs(inp, exist_ok=True)
    (inp / "shared.safetensors").write_bytes((out / nerf_rel).read_bytes())
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(inp / "not_a_state.safetensors"))
    choices = load.INPUT_TYPES()["required"]["state_file"][0]
    assert choices == ["shared.safetensors", f"{nerf_rel} [output]", f"{mesh_rel} [output]"]
    # listing again reads no header (ComfyUI asks on every /object_info); a rewritten file is read again
    sf = importlib.import_module(f"{PACK_MODULE}.nodes.state_files")
    reads = []
    real = sf.read_state_header
    sf.read_state_header = lambda path: reads.append(os.path.basename(path)) or real(path)
    try:
        assert load.INPUT_TYPES()["required"]["state_file"][0] == choices and reads == []
        save_file({"y": torch.zeros(3)}, str(inp / "shared.safetensors"))  # no longer a state
        assert load.INPUT_TYPES()["required"]["state_file"][0] == choices[1:] and reads == ["shared.safetensors"]
        (inp / "shared.safetensors").write_bytes((out / nerf_rel).read_bytes())
        assert load.INPUT_TYPES()["required"]["state_file"][0] == choices
    finally:
        sf.read_state_header = real
    n_out, m_none = load().load(f"{nerf_rel} [output]")
    assert isinstance(m_none, NoState) and n_out.prompt == "a red cube"
    # the unfilled output is no silent None: using it says which output to use
    with pytest.raises(DreamFlowError, match="holds a NeRF state; use Load State's 'nerf' output"):
        NODES["DreamFlowSaveGLB"]().save(m_none, "dreamflow/x", 64, 0, 64)
    x = torch.rand(64, 3) * 2 - 1
    assert torch.equal(n_out.field.density(x), nerf.field.density(x))
    n_none, m_out = load().load(f"{mesh_rel} [output]")
    assert isinstance(n_none, NoState) and torch.equal(m_out.faces, mesh.faces) and torch.equal(m_out.vertices, mesh.vertices)
    assert isinstance(load().load("shared.safetensors")[1], NoState)
    assert load.IS_CHANGED("shared.safetensors") != load.IS_CHANGED(f"{nerf_rel} [output]")
    with pytest.raises(DreamFlowError, match="not found"):
        load().load("../output/" + nerf_rel)
    with pytest.raises(DreamFlowError, match="not a DreamFlow state"):
        load().load("not_a_state.safetensors")
    with pytest.raises(DreamFlowError, match="exactly one"):
        save.save("dreamflow/state", nerf=nerf, mesh=mesh)
    with pytest.raises(DreamFlowError, match="exactly one"):
        save.save("dreamflow/state")


def test_extract_mesh_node_on_a_real_nerf(folders):
    """The NeRF's initial density blob (magic3d bias, radius ~0.5) becomes a closed mesh; previews are images."""
    import trimesh

    mesh, preview = NODES["DreamFlowExtractMesh"]().extract(tiny_nerf(), 24, -1.0, 0, 2, 16)
    assert mesh.faces.shape[0] > 100
    tm = trimesh.Trimesh(mesh.vertices.numpy(), mesh.faces.numpy())
    r = abs(tm.vertices).max()
    assert 0.2 < r < 0.9 and tm.volume > 0
    assert preview.shape == (2, 16, 16, 3) and preview.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- widget tables
def test_a_new_widget_is_one_table_row():
    """One row gives the INPUT_TYPES entry (default from the config, tooltip from the field's docstring when the row
    has none) and the config change; the node's FUNCTION takes it by name."""
    from dreamflow.config import field_docs
    from dreamflow.stages import NeRFStageConfig

    widgets = importlib.import_module(f"{PACK_MODULE}.nodes.widgets")
    table = widgets.WidgetTable(widgets.Widget("lambda_sparsity", "lambda_sparsity", "FLOAT", 0.0, 1e4, 0.1),
                                widgets.Widget("grid_levels", "nerf.grid.n_levels", "INT", 1, 32, 1, "Levels."),
                                widgets.Widget("preview_views", kind="INT", lo=1, hi=64, default=8, tooltip="Views."))
    c = NeRFStageConfig()
    spec = table.inputs(c)
    assert list(spec) == ["lambda_sparsity", "grid_levels", "preview_views"]
    assert spec["lambda_sparsity"] == ("FLOAT", {"default": c.lambda_sparsity, "min": 0.0, "max": 1e4, "step": 0.1,
                                                 "round": False,
                                                 "tooltip": field_docs(NeRFStageConfig)["lambda_sparsity"]})
    assert spec["grid_levels"][1]["default"] == c.nerf.grid.n_levels and spec["preview_views"][1]["default"] == 8
    cfg = table.config(NeRFStageConfig, {"lambda_sparsity": 2.5, "grid_levels": 5, "preview_views": 3})
    assert (cfg.lambda_sparsity, cfg.nerf.grid.n_levels) == (2.5, 5) and cfg.nerf.grid.log2_hashmap_size == \
        c.nerf.grid.log2_hashmap_size

    seen = {}

    class Node:
        @table.method("denoiser", optional=("init",))
        def run(self, denoiser, init=None, **values):
            seen.update(values, denoiser=denoiser, init=init)

    params = list(inspect.signature(Node.run).parameters)
    assert params == ["self", "denoiser", "lambda_sparsity", "grid_levels", "preview_views", "init"]
    Node().run(denoiser="d", lambda_sparsity=1.0, grid_levels=2, preview_views=3)
    assert seen == {"denoiser": "d", "init": None, "lambda_sparsity": 1.0, "grid_levels": 2, "preview_views": 3}
    with pytest.raises(TypeError):
        Node().run(denoiser="d", lambda_sparsity=1.0, grid_levels=2)  # a missing widget fails as with a signature
    with pytest.raises(TypeError):
        Node().run(denoiser="d", lambda_sparsity=1.0, grid_levels=2, preview_views=3, typo=1)


@pytest.mark.parametrize("node_id", ["DreamFlowNeRFStage", "DreamFlowExtractMesh", "DreamFlowMeshStage",
                                     "DreamFlowSDXLRefine", "DreamFlowSaveGLB"])
def test_node_widgets_come_from_its_table(node_id):
    """Every widget of the node is a row of its table, in INPUT_TYPES order (sockets first)."""
    cls = NODES[node_id]
    table = importlib.import_module(cls.__module__).WIDGETS
    required = list(cls.INPUT_TYPES()["required"])
    assert required[len(required) - len(table.names):] == list(table.names)


@pytest.mark.parametrize("node_id, table", [
    ("DreamFlowSaveState", "SAVE_WIDGETS"), ("DreamFlowLoadState", "LOAD_WIDGETS"), ("DreamFlowLoadMesh", "LOAD_WIDGETS"),
    ("DreamFlowCoreMeshToMesh", "CORE_WIDGETS"), ("DreamFlowTrimeshToMesh", "TRIMESH_WIDGETS")])
def test_file_and_converter_widgets_come_from_their_tables(node_id, table):
    """Modules with several nodes: each node's widgets are the rows of its own table (sockets first), and its
    FUNCTION takes them in that order."""
    cls = NODES[node_id]
    rows = getattr(importlib.import_module(cls.__module__), table)
    required = cls.INPUT_TYPES()["required"]
    sockets = list(required)[:len(required) - len(rows.names)]
    assert list(required)[len(sockets):] == list(rows.names)
    assert all(isinstance(required[n][0], str) and required[n][0] not in WIDGET_TYPES for n in sockets), sockets


#: The widgets and sockets of the nodes that moved onto widget tables late (issue 18: state files, Load Mesh, the
#: MESH / TRIMESH converters) as they were before: name, type and every option but the tooltip, in order. Saved
#: workflows store widget values by position, so none of this may change in a refactor. FILES: a list of this
#: machine's files (its content is the folders', tested with each node).
FILES = "<files>"
#: The mesh-import settings that end Load Mesh's and both converters' widgets.
PINNED_IMPORT = [
    ("up_axis", ["+Y", "+Z"], {"default": "+Y"}),
    ("decimate_to", "INT", {"default": 0, "min": 0, "max": 500000}),
    ("color_fit_steps", "INT", {"default": 100, "min": 0, "max": 10000}),
    ("grid_levels", "INT", {"default": 16, "min": 1, "max": 32, "step": 1}),
    ("grid_log2_size", "INT", {"default": 19, "min": 10, "max": 24, "step": 1})]
PINNED_INPUTS = {
    "DreamFlowSaveState": {
        "required": [("filename_prefix", "STRING", {"default": "dreamflow/state"})],
        "optional": [("nerf", "DREAMFLOW_NERF", {}), ("mesh", "DREAMFLOW_MESH", {})]},
    "DreamFlowLoadState": {"required": [("state_file", FILES, {"dreamflow_dynamic": True})]},
    "DreamFlowLoadMesh": {"required": [
        ("mesh_file", FILES, {"dreamflow_dynamic": True}),
        ("recenter", "BOOLEAN", {"default": True}),
        ("keep_colors", "BOOLEAN", {"default": True}),
        *PINNED_IMPORT]},
    "DreamFlowCoreMeshToMesh": {"required": [
        ("mesh", "MESH", {}),
        ("index", "INT", {"default": 0, "min": 0, "max": 4096}),
        ("recenter", "BOOLEAN", {"default": False}),
        *PINNED_IMPORT]},
    "DreamFlowTrimeshToMesh": {"required": [
        ("trimesh", "TRIMESH", {}),
        ("recenter", "BOOLEAN", {"default": False}),
        ("keep_colors", "BOOLEAN", {"default": True}),
        *PINNED_IMPORT]},
    "DreamFlowMeshToCoreMesh": {"required": [("mesh", "DREAMFLOW_MESH", {})]},
    "DreamFlowMeshToTrimesh": {"required": [("mesh", "DREAMFLOW_MESH", {})]},
}


@pytest.mark.parametrize("node_id", sorted(PINNED_INPUTS))
def test_widgets_are_pinned_across_refactors(node_id):
    """Names, order, types, defaults and ranges of each node's inputs as before its widget table; the FUNCTION
    takes them in that order."""
    cls = NODES[node_id]
    spec = cls.INPUT_TYPES()
    got = {section: [(name, FILES if s[1].get("dreamflow_dynamic") else s[0],
                      {k: v for k, v in s[1].items() if k != "tooltip"}) for name, s in inputs.items()]
           for section, inputs in spec.items()}
    assert got == PINNED_INPUTS[node_id]
    assert all(len(s[1]["tooltip"]) > 10 for inputs in spec.values() for s in inputs.values())
    params = list(inspect.signature(getattr(cls, cls.FUNCTION)).parameters)[1:]
    assert params == [name for section in ("required", "optional") for name, *_ in PINNED_INPUTS[node_id].get(section, [])]


def test_a_new_guidance_method_reaches_the_stage_nodes_from_its_own_file():
    """A registered method (what its one file does) is in every stage node's method dropdown, in its order (ties by
    name), and its ``summary`` in the tooltip: no node file names the methods."""
    from dreamflow.guidance import REGISTRY, Guidance, register

    @register
    class Zero(Guidance):
        name, order, summary = "zero-test", 1, "a test method that never moves the scene"

    try:
        for node_id in ("DreamFlowNeRFStage", "DreamFlowMeshStage", "DreamFlowSDXLRefine"):
            choices, opts = NODES[node_id].INPUT_TYPES()["required"]["method"]
            assert choices == ["apfo", "sds", "zero-test", "vsd"] and opts["default"] == "apfo"
            assert opts["tooltip"].startswith("apfo: DreamFlow's approximate probability flow")
            assert "; zero-test: a test method that never moves the scene; vsd: " in opts["tooltip"]
    finally:
        REGISTRY.pop("zero-test")
    assert "zero-test" not in NODES["DreamFlowNeRFStage"].INPUT_TYPES()["required"]["method"][0]


def test_load_denoiser_widgets_come_from_its_tables():
    """LoadDenoiser: every widget is a row of its tables (required, then the optional ones added later), in
    INPUT_TYPES order, and its FUNCTION takes them in that order."""
    cls = NODES["DreamFlowLoadDenoiser"]
    module = importlib.import_module(cls.__module__)
    spec = cls.INPUT_TYPES()
    assert list(spec["required"]) == list(module.WIDGETS.names) == [
        "model_name", "dtype", "device", "cpu_offload", "vae_tiling", "fast_path", "vae_precision"]
    assert list(spec["optional"]) == list(module.OPTIONAL_WIDGETS.names) == ["memory"]
    assert "default" not in spec["required"]["model_name"][1]  # a list of this machine's files: ComfyUI shows the first
    config = cls.build_config(model_name="m", dtype="bf16", device="cpu", cpu_offload=True, vae_tiling=False,
                              fast_path="graphs", vae_precision="fp32", memory="low_vram")
    assert (config.model_name, config.dtype, config.cpu_offload, config.fast_path, config.vae_precision,
            config.memory) == ("m", "bf16", True, "graphs", "fp32", "low_vram")
