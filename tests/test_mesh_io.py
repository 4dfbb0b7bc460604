"""Meshes made elsewhere in and out of DreamFlow (issue 16): Load Mesh for each file format and each bad file,
converters to / from core MESH and TRIMESH round-tripping exactly, texture-only stages keeping vertices bit for
bit, the example custom stage between two DreamFlow nodes, the offline texture workflow making a valid GLB, and
the requests to ComfyUI's model management before a denoiser loads or runs.
"""

from __future__ import annotations

import json
import os
import sys
import types

import numpy as np
import pytest
import torch

from dreamflow import hosting
from dreamflow.errors import DreamFlowError
from dreamflow.scene.mesh import uv_sphere, weld_positions
from dreamflow.mesh_io import (MeshImportConfig, from_arrays, from_trimesh, load_mesh_file, to_core_arrays,
                                     to_trimesh, vertex_colors)
from dreamflow.state import MeshState

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SMALL = dict(fit_steps=60, fit_points=2048, fit_lr=3e-2, **{"field.grid.n_levels": 4, "field.grid.log2_hashmap_size": 12})
RED, BLUE = (0.85, 0.10, 0.10), (0.12, 0.25, 0.90)


def small(**more) -> MeshImportConfig:
    from dreamflow.config import replace

    return replace(MeshImportConfig(), **{**SMALL, **more}).validate()


def two_tone_box():
    """A 2 x 1 x 1 box, vertex-coloured: red where x < 0, blue where x > 0 (trimesh, no processing)."""
    import trimesh

    box = trimesh.creation.box(extents=(2.0, 1.0, 1.0))
    colours = np.where(box.vertices[:, :1] < 0, RED, BLUE)
    box.visual = trimesh.visual.ColorVisuals(box, vertex_colors=np.concatenate([colours, np.ones((8, 1))], 1))
    return box


def textured_box():
    """The same box with a texture: left half of the image red, right half blue; u = 0 / 1 at x = -1 / +1."""
    import trimesh
    from PIL import Image

    box = trimesh.creation.box(extents=(2.0, 1.0, 1.0))
    box = box.subdivide()  # vertices inside the faces, so the texture varies across them
    img = Image.new("RGB", (16, 16), tuple(int(c * 255) for c in BLUE))
    img.paste(tuple(int(c * 255) for c in RED), (0, 0, 8, 16))
    uv = np.stack([(box.vertices[:, 0] + 1) / 2, np.full(len(box.vertices), 0.5)], 1)
    box.visual = trimesh.visual.TextureVisuals(uv=uv, material=trimesh.visual.material.PBRMaterial(
        baseColorTexture=img))
    return box


def albedo_at(state: MeshState, points) -> np.ndarray:
    return state.color_fn()(torch.tensor(points, dtype=torch.float32)).numpy()


def assert_two_tone(state: MeshState, tol=0.12):
    """Recentred to half-extent 0.45 along x: left end red, right end blue (the fit reproduced the file's colours)."""
    got = albedo_at(state, [[-0.4, 0.225, 0.0], [0.4, 0.225, 0.0], [-0.4, 0.0, 0.225], [0.4, 0.0, -0.225]])
    np.testing.assert_allclose(got[[0, 2]], [RED, RED], atol=tol)
    np.testing.assert_allclose(got[[1, 3]], [BLUE, BLUE], atol=tol)


# ----------------------------------------------------------------------------------------------
# Loading files
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".glb", ".gltf", ".obj", ".ply"])
def test_each_format_loads_recentred_with_its_colours(tmp_path, ext):
    box = textured_box() if ext in (".glb", ".gltf", ".obj") else two_tone_box()
    path = str(tmp_path / f"box{ext}")
    box.export(path)
    state = load_mesh_file(path, small())
    v = state.vertices.numpy()
    np.testing.assert_allclose(v.min(0), [-0.45, -0.225, -0.225], atol=1e-5)
    np.testing.assert_allclose(v.max(0), [0.45, 0.225, 0.225], atol=1e-5)
    assert state.faces.dtype == torch.int64 and len(state.faces) == len(box.faces)
    assert len(v) == len(np.unique(box.vertices, axis=0))  # welded: one vertex per position (seams closed)
    assert state.history == [f"LoadMesh(file box{ext})"] and state.settings["color_fit"]["mse"] < 0.01
    assert_two_tone(state)


def test_colours_dropped_or_kept_and_z_up_turned(tmp_path):
    path = str(tmp_path / "box.ply")
    two_tone_box().export(path)
    plain = load_mesh_file(path, small(colors=False))
    assert plain.settings["color_fit"] is None
    got = albedo_at(plain, [[-0.4, 0.2, 0.0], [0.4, 0.2, 0.0]])
    assert np.abs(got[0] - got[1]).max() < 0.2  # no red / blue split without the file's colours
    turned = load_mesh_file(path, small(up_axis="+Z", fit_steps=0))
    np.testing.assert_allclose(turned.vertices.numpy().max(0), [0.45, 0.225, 0.225], atol=1e-5)
    # +Z up: the file's z becomes y; with recenter off the coordinates are kept as given
    kept = load_mesh_file(path, small(recenter=False, extent=0.45, fit_steps=0))
    np.testing.assert_allclose(kept.vertices.numpy().max(0), [1.0, 0.5, 0.5], atol=1e-6)


def test_shipped_toy_mesh_loads_with_its_two_colours():
    from dreamflow.runner.defs import pack_root
    from dreamflow.toy.world import COLOURS, SECONDARY_COLOURS, shape_mesh

    state = load_mesh_file(os.path.join(pack_root(), "samples", "toy_mushroom.glb"), small(recenter=False))
    v, f = shape_mesh("mushroom")
    assert len(state.faces) == len(weld_positions(v.double().numpy(), f.numpy(), drop_collapsed=True)[1]) < len(f)  # poles welded
    assert float((state.vertices.max(0).values - v.max(0).values).abs().max()) < 1e-6
    got = albedo_at(state, [[0.0, 0.38, 0.0], [0.12, -0.3, 0.0]])  # cap top, stem side
    np.testing.assert_allclose(got[0], COLOURS["red"], atol=0.15)
    np.testing.assert_allclose(got[1], SECONDARY_COLOURS["mushroom"], atol=0.15)


def _write(path, text_or_bytes):
    mode = "wb" if isinstance(text_or_bytes, bytes) else "w"
    with open(path, mode) as f:
        f.write(text_or_bytes)
    return str(path)


@pytest.mark.parametrize("name,content,message", [
    ("noise.glb", b"\x00\x01garbage" * 10, "is not a readable mesh file"),
    ("points.ply", "ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\n"
                   "end_header\n0 0 0\n1 0 0\n0 1 0\n", "no triangle mesh (only PointCloud)"),
    ("lines.obj", "v 0 0 0\nv 1 0 0\nv 0 1 0\nl 1 2\n", "no triangle mesh"),
    ("nan.obj", "v 0 0 0\nv nan 0 0\nv 0 1 0\nf 1 2 3\n", "1 vertices with non-finite coordinates"),
    ("model.fbx", "Kaydara FBX", "unknown extension '.fbx'"),
])
def test_bad_files_are_refused_in_one_line(tmp_path, name, content, message):
    path = _write(tmp_path / name, content)
    with pytest.raises(DreamFlowError) as e:
        load_mesh_file(path, small())
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert name in str(e.value)


def test_no_faces_missing_file_and_too_many_faces(tmp_path, monkeypatch):
    import dreamflow.mesh_io as mio

    with pytest.raises(DreamFlowError, match="no faces"):
        from_arrays(np.zeros((3, 3)), np.zeros((0, 3), dtype=np.int64), small())
    with pytest.raises(DreamFlowError, match="file 'gone.glb' not found"):
        load_mesh_file(str(tmp_path / "gone.glb"), small())
    v, f = uv_sphere(8, 16)
    path = str(tmp_path / "sphere.obj")
    to_trimesh(from_arrays(v, f, small(fit_steps=0)), colors=False).export(path)
    monkeypatch.setattr(mio, "MAX_FACES", 100)
    with pytest.raises(DreamFlowError) as e:
        load_mesh_file(path, small(fit_steps=0))
    assert f"has {len(f)} faces, more than the 100" in str(e.value) and "set decimate_to" in str(e.value)
    decimated = load_mesh_file(path, small(fit_steps=0, decimate_to=100))
    assert 0 < len(decimated.faces) <= 100


# ----------------------------------------------------------------------------------------------
# Converters
# ----------------------------------------------------------------------------------------------
def _state_with_negative_zero() -> MeshState:
    v, f = uv_sphere(6, 12, radius=0.4)
    v[0, 0] = -0.0
    return from_arrays(v, f, small(recenter=False, fit_steps=0))


def test_core_mesh_round_trip_is_exact_through_the_nodes():
    from dreamflow.runner.defs import load_node_pack

    pack = load_node_pack().NODE_CLASS_MAPPINGS
    state = _state_with_negative_zero()
    (core,) = pack["DreamFlowMeshToCoreMesh"]().convert(state)
    assert core.vertices.shape == (1, *state.vertices.shape) and core.faces.shape == (1, *state.faces.shape)
    widgets = dict(recenter=False, up_axis="+Y", decimate_to=0, color_fit_steps=0, grid_levels=4, grid_log2_size=12)
    (back,) = pack["DreamFlowCoreMeshToMesh"]().convert(core, 0, **widgets)
    assert back.vertices.numpy().tobytes() == state.vertices.numpy().tobytes()  # bit for bit, -0.0 included
    assert torch.equal(back.faces, state.faces)
    with pytest.raises(DreamFlowError, match="index 1 is past the MESH batch of 1"):
        pack["DreamFlowCoreMeshToMesh"]().convert(core, 1, **widgets)
    with pytest.raises(DreamFlowError, match="not core's MESH"):
        pack["DreamFlowCoreMeshToMesh"]().convert("a string", 0, **widgets)


def test_trimesh_round_trip_is_exact_and_carries_the_colour_field():
    import trimesh

    from dreamflow.runner.defs import load_node_pack

    pack = load_node_pack().NODE_CLASS_MAPPINGS
    state = from_arrays(*uv_sphere(6, 12, radius=0.4), small(recenter=False, fit_steps=0))
    (tm,) = pack["DreamFlowMeshToTrimesh"]().convert(state)
    assert isinstance(tm, trimesh.Trimesh)
    np.testing.assert_array_equal(tm.vertices.astype(np.float32), state.vertices.numpy())
    np.testing.assert_array_equal(tm.faces, state.faces.numpy())
    expected = np.round(albedo_at(state, state.vertices.numpy()).clip(0, 1) * 255)
    np.testing.assert_array_equal(tm.visual.vertex_colors[:, :3], expected)
    widgets = dict(recenter=False, keep_colors=True, up_axis="+Y", decimate_to=0, color_fit_steps=150,
                   grid_levels=4, grid_log2_size=12)
    (back,) = pack["DreamFlowTrimeshToMesh"]().convert(tm, **widgets)
    assert torch.equal(back.vertices, state.vertices) and torch.equal(back.faces, state.faces)
    # the colours came back through the fit (vertex colours -> colour field), close to the original field
    np.testing.assert_allclose(vertex_colors(back)[:, :3].astype(float), expected, atol=0.1 * 255)


def test_trimesh_converter_refuses_other_objects():
    with pytest.raises(DreamFlowError, match="expected a trimesh.Trimesh, got dict"):
        from_trimesh({}, small())


# ----------------------------------------------------------------------------------------------
# Texture-only stages
# ----------------------------------------------------------------------------------------------
TINY_STAGE = dict(iterations=6, resolution=16, denoise_resolution=16, views_per_update=1)
"""6 updates: the first two draw textureless shading (seed 0), which leaves the colour field alone."""


def test_texture_only_mesh_stage_and_refine_keep_vertices_bit_identical(tiny_sd, tiny_refiner, monkeypatch):
    from dreamflow.config import replace
    from dreamflow.runner.defs import load_node_pack, node_defs
    from dreamflow.stages import RefineConfig, loop, run_refine_stage

    rooms = []
    monkeypatch.setattr(loop, "make_room", lambda device, why="": rooms.append((str(device), why)))
    state = _state_with_negative_zero()
    before = state.vertices.numpy().tobytes()
    colour_before = albedo_at(state, state.vertices.numpy())
    node = load_node_pack().NODE_CLASS_MAPPINGS["DreamFlowMeshStage"]()
    inputs = {w.name: w.options.get("default") for w in node_defs()["DreamFlowMeshStage"].widgets()}
    inputs.update(denoiser=tiny_sd, mesh=state, prompt="a red cube", texture_only=True, lr_grid=0.1, lr_mlp=0.1,
                  preview_views=1, preview_resolution=16, **TINY_STAGE)
    out, preview = node.run(**inputs)
    assert out.vertices.numpy().tobytes() == before and torch.equal(out.faces, state.faces)
    assert not np.array_equal(albedo_at(out, state.vertices.numpy()), colour_before)  # the texture did change
    assert out.settings["optimize_geometry"] is False and preview.shape == (1, 16, 16, 3)
    moved, _ = node.run(**{**inputs, "texture_only": False, "lr_geometry": 0.5})
    assert moved.vertices.numpy().tobytes() != before  # the switch is what froze them
    refined = run_refine_stage(tiny_refiner, out, "a red cube", "", replace(RefineConfig(), **TINY_STAGE))
    assert refined.vertices.numpy().tobytes() == before
    assert rooms == [("cpu", "MeshStage"), ("cpu", "MeshStage"), ("cpu", "SDXLRefine")]


# ----------------------------------------------------------------------------------------------
# Sharing the card with ComfyUI
# ----------------------------------------------------------------------------------------------
def test_make_room_asks_comfyui_model_management_as_its_loaders_do(monkeypatch, tiny_sd_path):
    calls = []
    mm = types.SimpleNamespace(
        free_memory=lambda required, device, keep_loaded=[]: calls.append((required, str(device))),
        minimum_inference_memory=lambda: 1000.0, get_torch_device=lambda: torch.device("cuda", 0))
    monkeypatch.setattr(hosting, "comfy_module", lambda name: mm if name == "model_management" else None)
    assert hosting.make_room("cpu") is False and calls == []  # the CPU is not ComfyUI's to manage
    assert hosting.make_room(torch.device("cuda"), 5000) is True
    assert calls == [(6000.0, "cuda:0")]  # ComfyUI names its device cuda:0; + its inference reserve
    assert hosting.make_room("cuda:1") is True and calls[-1] == (1e30, "cuda:1")  # a stage: all it can
    mm.free_memory = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    assert hosting.make_room("cuda:0", 1) is False  # logged, never stops the work
    monkeypatch.setattr(hosting, "comfy_module", lambda name: None)
    assert hosting.make_room("cuda:0", 1) is False  # headless


def test_denoiser_load_makes_room_for_its_weights(monkeypatch, tiny_sd_path):
    from dreamflow.denoisers import Denoiser
    from dreamflow.denoisers.loading import weights_bytes

    asked = []
    monkeypatch.setattr(hosting, "make_room", lambda device, required=None, why="": asked.append((str(device), required, why)))
    Denoiser.load(tiny_sd_path, dtype="fp32", device="cpu")
    size = weights_bytes(tiny_sd_path)
    assert size > 0 and asked == [("cpu", size, f"loading {tiny_sd_path}")]


# ----------------------------------------------------------------------------------------------
# Workflows: the example custom stage, the offline texture workflow
# ----------------------------------------------------------------------------------------------
def _run_workflow(path, sets, tmp_path, monkeypatch, custom_nodes=()):
    from dreamflow.runner import run_prompt
    from dreamflow.runner.cli import prepare, saved_files

    monkeypatch.setenv("DREAMFLOW_OUTPUT", str(tmp_path))
    prompt, ui, defs = prepare(path, sets, log=lambda s: None, custom_nodes=custom_nodes)
    result = run_prompt(prompt, defs, workflow=ui, log=lambda s: None, keep_outputs=True)
    return prompt, result, saved_files(result.ui, str(tmp_path))


FAST_LOAD = ["DreamFlowLoadMesh.color_fit_steps=20", "DreamFlowLoadMesh.grid_levels=4",
             "DreamFlowLoadMesh.grid_log2_size=12", "DreamFlowSaveGLB.texture_size=64", "DreamFlowSaveGLB.turntable_views=0"]


def test_example_custom_stage_runs_between_two_dreamflow_nodes(tmp_path, monkeypatch):
    import trimesh

    from dreamflow.runner.build import EXAMPLE_STAGE
    from dreamflow.runner.defs import pack_root
    from gltf_validator import validate_glb

    root = pack_root()
    prompt, result, files = _run_workflow(os.path.join(root, "samples", "dreamflow_custom_stage_example.json"),
                                          FAST_LOAD, tmp_path, monkeypatch, [os.path.join(root, EXAMPLE_STAGE)])
    (smooth_id,) = [k for k, v in prompt.items() if v["class_type"] == "DreamFlowExampleSmoothMesh"]
    (load_id,) = [k for k, v in prompt.items() if v["class_type"] == "DreamFlowLoadMesh"]
    assert prompt[smooth_id]["inputs"]["mesh"] == [load_id, 0]
    (glb,) = [f for f in files if f.endswith(".glb")]
    report = validate_glb(glb)
    assert report["issues"]["numErrors"] == 0, report["issues"]
    (geom,) = trimesh.load(glb).geometry.values()
    loaded = result.outputs[load_id][0]
    smoothed = result.outputs[smooth_id][0]
    assert smoothed.history[-1] == "ExampleSmoothMesh" and loaded.history[-1] != "ExampleSmoothMesh"
    assert not torch.equal(smoothed.vertices, loaded.vertices) and torch.equal(smoothed.faces, loaded.faces)
    # what was saved is the smoothed mesh (Taubin keeps the size within a few per cent)
    sv = smoothed.vertices.numpy()
    np.testing.assert_allclose(geom.bounds, np.stack([sv.min(0), sv.max(0)]), atol=1e-5)
    assert np.abs(geom.bounds - np.stack([loaded.vertices.numpy().min(0), loaded.vertices.numpy().max(0)])).max() > 1e-4


def test_toy_texture_workflow_makes_a_valid_glb_with_the_files_geometry(tmp_path, monkeypatch):
    import trimesh

    from dreamflow.runner.defs import pack_root
    from gltf_validator import validate_glb

    sets = FAST_LOAD + ["DreamFlowMeshStage.iterations=2", "DreamFlowMeshStage.resolution=16",
                        "DreamFlowMeshStage.denoise_resolution=16", "DreamFlowMeshStage.views_per_update=1",
                        "DreamFlowMeshStage.preview_views=1", "DreamFlowMeshStage.preview_resolution=16",
                        "DreamFlowLoadDenoiser.device=cpu"]
    prompt, result, files = _run_workflow(os.path.join(pack_root(), "workflows", "DreamFlow texture a mesh offline.json"),
                                          sets, tmp_path, monkeypatch)
    (stage_id,) = [k for k, v in prompt.items() if v["class_type"] == "DreamFlowMeshStage"]
    (load_id,) = [k for k, v in prompt.items() if v["class_type"] == "DreamFlowLoadMesh"]
    assert prompt[stage_id]["inputs"]["texture_only"] is True
    loaded, textured = result.outputs[load_id][0], result.outputs[stage_id][0]
    assert textured.vertices.numpy().tobytes() == loaded.vertices.numpy().tobytes()
    (glb,) = [f for f in files if f.endswith(".glb")]
    report = validate_glb(glb)
    assert report["issues"]["numErrors"] == 0, report["issues"]
    (geom,) = trimesh.load(glb).geometry.values()
    np.testing.assert_allclose(geom.bounds, np.stack([loaded.vertices.numpy().min(0), loaded.vertices.numpy().max(0)]),
                               atol=1e-5)
    assert len(geom.faces) == len(loaded.faces)


def test_load_mesh_node_lists_uploads_and_the_shipped_example(tmp_path, monkeypatch):
    from dreamflow.runner.defs import load_node_pack

    monkeypatch.setenv("DREAMFLOW_INPUT", str(tmp_path))
    os.makedirs(tmp_path / "3d")
    two_tone_box().export(str(tmp_path / "3d" / "box.ply"))
    _write(tmp_path / "notes.txt", "not a mesh")
    node = load_node_pack().NODE_CLASS_MAPPINGS["DreamFlowLoadMesh"]
    files, options = node.INPUT_TYPES()["required"]["mesh_file"]
    assert files == ["3d/box.ply", "toy_mushroom.glb [example]"] and options["dreamflow_dynamic"] is True
    widgets = dict(recenter=True, keep_colors=False, up_axis="+Y", decimate_to=0, color_fit_steps=0, grid_levels=4,
                   grid_log2_size=12)
    (state,) = node().load("3d/box.ply", **widgets)
    assert len(state.faces) == 12
    with pytest.raises(DreamFlowError, match="'missing.glb' not found"):
        node().load("missing.glb", **widgets)
    with pytest.raises(DreamFlowError, match="unknown extension '.txt'"):
        node().load("notes.txt", **widgets)
