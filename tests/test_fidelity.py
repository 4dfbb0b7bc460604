"""The GLB fidelity measures (dreamflow/toy/fidelity.py) on GLBs with known answers: the true object, and objects
spoiled in one way each (a filled torus hole, a squashed cube, a floater, a wrong colour)."""

import numpy as np
import pytest
import torch

from dreamflow.errors import DreamFlowError
from dreamflow.export import ExportConfig, export_glb
from dreamflow.toy import fidelity as F
from dreamflow.toy.world import COLOURS, SECONDARY_COLOURS, part_masks, shape_mesh


def _world_glb(tmp_path, shape, colour, vertices=None, faces=None, name="obj", colour_rgb=None):
    """A GLB of the world object (or of ``vertices``/``faces``) textured with the world's part colours."""
    v, f = shape_mesh(shape)
    v = v if vertices is None else torch.as_tensor(vertices, dtype=torch.float32)
    f = f if faces is None else torch.as_tensor(faces, dtype=torch.long)
    main = torch.tensor(colour_rgb or COLOURS[colour])
    second = torch.tensor(SECONDARY_COLOURS.get(shape, (0.0, 0.0, 0.0)))

    def color_fn(p):
        m = part_masks(shape, p)
        return m[:, :1] * main + m[:, 1:2] * second

    path = str(tmp_path / f"{name}.glb")
    return export_glb(v, f, color_fn, path, ExportConfig(texture_size=128, padding=4, chart_padding=2))


def test_true_object_scores_perfectly_and_passes(tmp_path):
    # moved and scaled: the measures match centre and scale first
    v, f = shape_mesh("torus")
    path = _world_glb(tmp_path, "torus", "blue", vertices=v * 1.7 + torch.tensor([0.1, -0.2, 0.05]), faces=f)
    fid = F.glb_fidelity(path, "torus", "blue", samples=3000, resolution=96)
    assert fid.iou_mean > 0.98 and fid.iou_min > 0.97
    assert fid.hole_iou is not None and fid.hole_iou > 0.95
    assert fid.chamfer < 0.01  # sampling noise only
    assert fid.delta_e < 1.5 and fid.colour_nearest == "blue"
    assert fid.floaters == 0.0
    assert F.passes(fid), F.failures(fid)


@pytest.mark.parametrize("yaw", [10.0, 30.0, 45.0])
def test_turned_true_cube_passes(tmp_path, yaw):
    """A true cube turned about the vertical is still a true cube: scale is matched after the yaw, since a cube's
    box along x and z grows with its turn (matched before, a cube turned 30 degrees scored IoU 0.65, Chamfer 0.081
    and failed, so every generated cube at a random yaw was judged smaller than it is)."""
    v, f = shape_mesh("cube")
    turned = v.float() @ torch.from_numpy(F.yaw_matrix(yaw)).float().T
    fid = F.glb_fidelity(_world_glb(tmp_path, "cube", "red", vertices=turned * 0.8, faces=f), "cube", "red",
                         samples=3000, resolution=96)
    assert fid.iou_mean > 0.98 and fid.iou_min > 0.97 and fid.chamfer < 0.02, (fid.iou_mean, fid.chamfer)  # sampling noise ~0.013
    assert F.passes(fid), F.failures(fid)


def test_filled_torus_hole_fails_on_the_hole_not_on_plain_iou(tmp_path):
    # a torus whose hole is closed by a disc: the plain top-view IoU stays high, the hole IoU drops to 0
    tv, tf = shape_mesh("torus")
    r = 0.31
    n = 48
    ang = torch.arange(n) * (2 * np.pi / n)
    disc_v = torch.cat([torch.zeros(1, 3), torch.stack([r * torch.sin(ang), torch.zeros(n), r * torch.cos(ang)], 1)])
    disc_f = torch.stack([torch.zeros(n, dtype=torch.long), 1 + torch.arange(n), 1 + (torch.arange(n) + 1) % n], 1)
    v = torch.cat([tv, disc_v])
    f = torch.cat([tf, disc_f + tv.shape[0], disc_f[:, [0, 2, 1]] + tv.shape[0]])
    path = _world_glb(tmp_path, "torus", "blue", vertices=v, faces=f)
    fid = F.glb_fidelity(path, "torus", "blue", samples=3000, resolution=96)
    assert fid.hole_iou is not None and fid.hole_iou < 0.05
    assert fid.iou_top > 0.8  # what a plain IoU would have accepted
    assert any("hole" in msg for msg in F.failures(fid))


def test_squashed_cube_fails_on_silhouettes(tmp_path):
    v, f = shape_mesh("cube")
    path = _world_glb(tmp_path, "cube", "red", vertices=v * torch.tensor([1.0, 0.45, 1.0]), faces=f)
    fid = F.glb_fidelity(path, "cube", "red", samples=3000, resolution=96)
    assert fid.iou_min < F.THRESHOLDS["iou_min"]
    assert fid.chamfer > F.THRESHOLDS["chamfer"]
    assert not F.passes(fid)
    assert fid.colour_nearest == "red"  # only the shape is wrong


def test_floater_is_measured_on_the_welded_mesh(tmp_path):
    # a small detached sphere beside a sphere; the GLB's UV seams split vertices, welding must not count those
    v, f = shape_mesh("sphere")
    speck = v * 0.25 + torch.tensor([0.8, 0.0, 0.0])
    path = _world_glb(tmp_path, "sphere", "green", vertices=torch.cat([v, speck]),
                      faces=torch.cat([f, f + v.shape[0]]))
    glb = F.load_glb(path)
    assert len(glb.vertices) > len(v) * 2  # seams split vertices in the file
    frac = F.floater_fraction(glb.vertices, glb.faces)
    assert frac == pytest.approx(0.25 ** 2 / (1 + 0.25 ** 2), rel=0.03)
    clean = _world_glb(tmp_path, "sphere", "green", name="clean")
    g = F.load_glb(clean)
    assert F.floater_fraction(g.vertices, g.faces) == 0.0


def test_wrong_colour_is_named(tmp_path):
    path = _world_glb(tmp_path, "cone", "orange", colour_rgb=COLOURS["yellow"])
    fid = F.glb_fidelity(path, "cone", "orange", samples=2000, resolution=64)
    assert fid.colour_nearest == "yellow"
    assert fid.delta_e > 10
    assert any("reads as yellow" in msg for msg in F.failures(fid))


def test_delta_e_matches_a_published_pair():
    # Sharma, Wu & Dalal (2005), CIEDE2000 test data, pair 1: 2.0425
    a = np.array([50.0, 2.6772, -79.7751])
    b = np.array([50.0, 0.0, -82.7485])
    assert float(F.delta_e(a, b)) == pytest.approx(2.0425, abs=1e-4)


def test_load_glb_refuses_a_file_without_triangles(tmp_path):
    import trimesh

    path = str(tmp_path / "points.glb")
    trimesh.Scene([trimesh.PointCloud(np.random.rand(10, 3))]).export(path)
    with pytest.raises(DreamFlowError, match="no triangle mesh"):
        F.load_glb(path)


# --------------------------------------------------------------------------------------------
# The demo itself (issue 15 item 4): make demo's settings, scored on the GLB file it writes
# --------------------------------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.timeout(1200)  # ~1-2 min a prompt on 2 idle cores; several times that on a busy machine
@pytest.mark.parametrize("prompt, shape, colour", [("a red torus", "torus", "red"), ("a blue snowman", "snowman", "blue")])
def test_demo_glb_is_the_right_object(tmp_path, prompt, shape, colour):
    """The demo's GLB (DemoConfig, seed 0, route 2 = the stages the toy workflow runs) meets every threshold: the
    torus's hole is open, shape, colour and floaters are right (blue snowman measured: IoU 0.79, Chamfer 0.033,
    Delta E 4.8). Measured on this CPU (2026-12-04), the demo's other
    shapes do not pass yet: green sphere Delta E 21.9 > 20, red cone IoU 0.70, green mushroom worst view 0.63 and
    Chamfer 0.042; cubes and cylinders fail for every method (bench/RESULTS.md "GLB fidelity"). Add a prompt here
    when it passes."""
    from dreamflow.demo import DemoConfig, run_direct

    torch.set_num_threads(1)
    glb = run_direct(prompt, DemoConfig(), str(tmp_path), log=lambda *a: None)
    fid = F.glb_fidelity(glb, shape, colour)
    assert F.passes(fid), f"{prompt}: {F.failures(fid)}"
    if shape == "torus":
        assert fid.hole_iou >= F.THRESHOLDS["hole_iou"]
