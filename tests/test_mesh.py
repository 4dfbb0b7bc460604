"""Mesh model (bounded offsets, regularisers, parameter groups) and mesh rendering (colour, coverage,
depth, shading, background, silhouette gradients, turntables). CPU, tiny, torch rasterizer.

Tolerances: projected coverage vs the analytic convex-hull area 1.5% (anti-aliased edges are exact
along straight edges; the residual comes from corner pixels); depth 1e-4 relative; Lambert shading
0.03 (interpolated vertex normals of a 32 x 48 UV sphere vs true radial normals).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dreamflow.errors import DreamFlowError
from dreamflow.render.cameras import make_cameras
from dreamflow.render.mesh_render import clip_positions, render_mesh, render_turntable
from dreamflow.scene.mesh import (MeshModel, MeshModelConfig, box_mesh, face_normals, grid_mesh, unique_edges,
                                  uv_sphere, vertex_normals, weld_positions)
from dreamflow.scene.nerf import NeRFField, NeRFFieldConfig
from dreamflow.scene.hashgrid import HashGridConfig


class ConstantColor(nn.Module):
    """Colour field stand-in: one learnable colour everywhere."""

    def __init__(self, rgb=(0.2, 0.6, 0.9)):
        super().__init__()
        self.rgb = nn.Parameter(torch.tensor(rgb))

    def albedo(self, points):
        return self.rgb.expand(points.shape[0], 3)


def hull_area(points):
    """Area of the 2D convex hull of points [K, 2] (monotone chain)."""
    pts = sorted(map(tuple, points.tolist()))

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = lower[:-1] + upper[:-1]
    return 0.5 * abs(sum(hull[i][0] * hull[i - 1][1] - hull[i - 1][0] * hull[i][1] for i in range(len(hull))))


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def test_primitives_normals_and_edges():
    v, f = uv_sphere(32, 48)
    n = vertex_normals(v, f)
    assert ((n * torch.nn.functional.normalize(v, dim=-1)).sum(-1) > 0.999).all()
    assert ((face_normals(v, f) * v[f].mean(1)).sum(-1) > 0).all()  # outward
    # Closed surface: Euler characteristic V - E + F = 2.
    assert v.shape[0] - unique_edges(f).shape[0] + f.shape[0] == 2
    bv, bf = box_mesh(0.5)
    assert bv.shape[0] - unique_edges(bf).shape[0] + bf.shape[0] == 2
    assert ((face_normals(bv, bf) * bv[bf].mean(1)).sum(-1) > 0).all()
    assert uv_sphere(126, 200)[1].shape[0] == 50000


# --------------------------------------------------------------------------------------------
# Mesh model
# --------------------------------------------------------------------------------------------
def test_model_init_bounds_and_groups():
    v, f = uv_sphere(8, 12)
    m = MeshModel(v, f, ConstantColor(), MeshModelConfig(max_offset=0.05))
    assert torch.equal(m.vertices(), v)
    assert m.laplacian_loss().item() == 0.0
    with torch.no_grad():
        m.offset.copy_(torch.randn_like(m.offset) * 1e3)
    d = (m.vertices() - v).abs()
    assert d.max() <= 0.05 + 1e-7 and d.max() > 0.049
    # Saved state: base geometry, faces, offsets, colour; derived topology is not saved.
    assert set(m.state_dict()) == {"base_vertices", "faces", "offset", "color.rgb"}
    groups = m.param_groups(lr_geometry=1e-3, lr_grid=1e-2, lr_mlp=1e-4)
    assert [(g["name"], g["lr"]) for g in groups] == [("geometry", 1e-3), ("mlp", 1e-4)]
    # With a NeRFField colour, its own grid / mlp split is used and every parameter appears once.
    field = NeRFField(NeRFFieldConfig(grid=HashGridConfig(n_levels=2, log2_hashmap_size=8), mlp_width=8))
    m = MeshModel(v, f, field)
    groups = m.param_groups(1e-3, 1e-2, 1e-4)
    assert [g["name"] for g in groups] == ["geometry", "grid", "mlp"]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    assert m.albedo(v[:5]).shape == (5, 3)


def test_model_rejects_bad_inputs():
    v, f = box_mesh()
    with pytest.raises(DreamFlowError, match="faces index vertices"):
        MeshModel(v, f + 1, ConstantColor())
    with pytest.raises(DreamFlowError, match="albedo"):
        MeshModel(v, f, nn.Linear(3, 3))
    with pytest.raises(DreamFlowError, match="max_offset"):
        MeshModel(v, f, ConstantColor(), MeshModelConfig(max_offset=-1.0))
    with pytest.raises(DreamFlowError, match="NaN"):
        MeshModel(v * float("nan"), f, ConstantColor())


def test_regularisers_values():
    v, f = grid_mesh(6)
    m = MeshModel(v, f, ConstantColor(), MeshModelConfig(max_offset=0.1))
    assert m.normal_consistency_loss().item() < 1e-7  # flat
    with torch.no_grad():  # a rigid translation is not rough: Laplacian 0
        m.offset.fill_(0.3)
    assert m.laplacian_loss().item() < 1e-12
    # Cube: 6 diagonal pairs with equal normals, 12 edge pairs at 90 degrees -> mean 12 / 18.
    bv, bf = box_mesh()
    cube = MeshModel(bv, bf, ConstantColor())
    assert abs(cube.normal_consistency_loss().item() - 12 / 18) < 1e-6
    # UV sphere 16 x 32: neighbouring faces differ by a few degrees.
    sv, sf = uv_sphere(16, 32)
    nc = MeshModel(sv, sf, ConstantColor()).normal_consistency_loss().item()
    assert 1 - math.cos(math.radians(2)) < nc < 1 - math.cos(math.radians(20))


def test_regularisers_decrease_under_optimisation():
    v, f = grid_mesh(6)
    m = MeshModel(v, f, ConstantColor(), MeshModelConfig(max_offset=0.1, offset_init_std=1.0))
    torch.manual_seed(0)
    opt = torch.optim.Adam([m.offset], lr=0.05)
    lap0, nc0 = m.laplacian_loss().item(), m.normal_consistency_loss().item()
    assert lap0 > 1e-4 and nc0 > 1e-2
    history = []
    for _ in range(30):
        loss = m.laplacian_loss() * 100 + m.normal_consistency_loss()
        history.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert m.laplacian_loss().item() < 0.5 * lap0
    assert m.normal_consistency_loss().item() < 0.5 * nc0
    assert history[-1] < history[0] and history[10] < history[0]


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def test_render_cube_colour_background_coverage_depth():
    v, f = box_mesh(0.5)
    colour = ConstantColor((0.2, 0.6, 0.9))
    H = W = 64
    cams = make_cameras([30.0, 0.0], [40.0, 0.0], 3.0, 45.0, H, W)
    bg = torch.tensor([1.0, 0.5, 0.0])
    out = render_mesh(v, f, colour.albedo, cams, background=bg, backend="torch")
    assert out["rgb"].shape == (2, H, W, 3) and out["opacity"].shape == (2, H, W, 1)
    assert out["depth"].shape == (2, H, W, 1) and out["normal"].shape == (2, H, W, 3)
    op = out["opacity"][..., 0]
    full, empty = op == 1, op == 0
    assert full.sum() > 500 and empty.sum() > 500
    assert torch.allclose(out["rgb"][full], torch.tensor([0.2, 0.6, 0.9]).expand(int(full.sum()), 3), atol=1e-6)
    assert torch.allclose(out["rgb"][empty], bg.expand(int(empty.sum()), 3), atol=1e-6)
    # Edge pixels blend the two.
    edge = (op > 0) & (op < 1)
    assert edge.sum() > 20
    # Coverage = projected area of the convex cube = area of the hull of its projected corners.
    ndc = clip_positions(v, cams)
    ndc = ndc[..., :2] / ndc[..., 3:]
    for k in range(2):
        area_px = hull_area(ndc[k]) * (W / 2) * (H / 2)
        assert abs(op[k].sum().item() - area_px) / area_px < 0.015, (op[k].sum().item(), area_px)
    # Front view: the visible face is z = +0.5 at distance 3 - 0.5 along the view axis; normal +Z.
    seen = out["rast"][1, ..., 3] > 0
    assert torch.allclose(out["depth"][1, ..., 0][seen], torch.tensor(2.5), rtol=1e-4)
    assert (out["depth"][~(out["rast"][..., 3] > 0)] == 0).all()
    n = out["normal"][out["rast"][..., 3] > 0]
    assert torch.allclose(n.norm(dim=-1), torch.ones(n.shape[0]), atol=1e-5)


def test_render_lambert_and_background_module():
    v, f = uv_sphere(32, 48)
    cams = make_cameras([10.0], [20.0], 2.5, 40.0, 48, 48)
    light = torch.tensor([3.0, 2.0, 1.0])
    albedo = torch.tensor([0.8, 0.5, 0.3])

    class DirBackground(nn.Module):
        def forward(self, dirs):
            return dirs * 0.5 + 0.5

    out = render_mesh(v, f, lambda p: albedo.expand(p.shape[0], 3), cams, background=DirBackground(),
                      light_positions=light, backend="torch", anti_alias=False)
    covered = out["rast"][0, ..., 3] > 0
    # Reference: Lambert with the true sphere normal at the interpolated surface point.
    from dreamflow.render.raster import interpolate
    pts = interpolate(v, out["rast"], f)[0][covered]
    n = torch.nn.functional.normalize(pts, dim=-1)
    l = torch.nn.functional.normalize(light - pts, dim=-1)
    ref = albedo * (0.1 + 0.9 * (n * l).sum(-1, keepdim=True).clamp_min(0))
    assert (out["rgb"][0][covered] - ref).abs().max() < 0.03
    _, dirs = cams.rays()
    assert torch.allclose(out["rgb"][0][~covered], (dirs[0] * 0.5 + 0.5)[~covered], atol=1e-6)
    with pytest.raises(DreamFlowError, match="needs light"):
        render_mesh(v, f, lambda p: albedo.expand(p.shape[0], 3), cams, shading="lambertian", backend="torch")


def test_silhouette_fitting_moves_vertices():
    # Fit the mesh model (cube) to the silhouettes of a 6% larger cube: only antialias gradients can do it.
    v, f = box_mesh(0.5)
    cams = make_cameras([20.0, 20.0, -10.0], [0.0, 120.0, 240.0], 3.0, 45.0, 32, 32)
    target = render_mesh(v * 1.06, f, lambda p: torch.ones(p.shape[0], 3), cams, backend="torch")["opacity"]
    m = MeshModel(v, f, ConstantColor(), MeshModelConfig(max_offset=0.1))
    opt = torch.optim.Adam([m.offset], lr=0.05)
    losses = []
    for _ in range(15):
        out = render_mesh(m.vertices(), m.faces, m.albedo, cams, backend="torch")
        loss = (out["opacity"] - target).square().mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        assert m.offset.grad.abs().sum() > 0
        opt.step()
    assert losses[-1] < 0.5 * losses[0], losses
    # The cube grew: mean |vertex| increased towards the target's 0.53.
    assert m.vertices().abs().mean().item() > 0.51


def test_turntable():
    v, f = box_mesh(0.5)
    grey = lambda p: torch.full((p.shape[0], 3), 0.5)  # noqa: E731
    imgs = render_turntable(v, f, grey, n_views=4, resolution=32, views_per_batch=3, backend="torch")
    assert imgs.shape == (4, 32, 32, 3) and imgs.dtype == torch.float32 and imgs.device.type == "cpu"
    assert imgs.min() >= 0 and imgs.max() <= 1
    # Unlit by default: white in the corners, exactly the albedo in the centre.
    assert torch.allclose(imgs[:, 0, 0], torch.ones(4, 3))
    assert torch.allclose(imgs[:, 16, 16], torch.full((4, 3), 0.5))
    # Batching views changes nothing but float rounding (batched matrix products).
    again = render_turntable(v, f, grey, n_views=4, resolution=32, views_per_batch=4, backend="torch")
    assert (imgs - again).abs().max() < 1e-5
    # Lit: the face turned to the camera-light is brightest; a cube looks alike from azimuth 0 and 180.
    lit = render_turntable(v, f, grey, n_views=4, resolution=32, shading="lambertian", backend="torch")
    assert (lit[:, 16, 16] > 0.1).all() and (lit[:, 16, 16] <= 0.5 + 1e-6).all()
    assert (lit[0] - lit[2]).abs().mean() < 0.02
    with pytest.raises(DreamFlowError, match="n_views"):
        render_turntable(v, f, lambda p: p, n_views=0)


# --------------------------------------------------------------------------------------------
# One geometry per update, one covered-pixel list per render (issue 6: no repeated work, no extra syncs)
# --------------------------------------------------------------------------------------------
def test_deform_is_the_separate_methods_bit_for_bit():
    """``deform()`` computes tanh and the normals once; every value equals the separate methods exactly,
    and so do the regularisers fed with it. Their gradients sum the same terms in another order: equal
    to 1e-6 relative (float32 re-association), not bit for bit."""
    v, f = uv_sphere(8, 12)
    m = MeshModel(v, f, ConstantColor(), MeshModelConfig(max_offset=0.05, offset_init_std=0.5))
    geo = m.deform()
    assert torch.equal(geo.vertices, m.vertices()) and torch.equal(geo.displacement, m.displacement())
    assert torch.equal(geo.face_normals, m.face_normals()) and torch.equal(geo.vertex_normals, m.vertex_normals())
    lap, nc = m.laplacian_loss(geo), m.normal_consistency_loss(geo)
    assert torch.equal(lap, m.laplacian_loss()) and torch.equal(nc, m.normal_consistency_loss())
    assert lap > 0 and nc > 0

    def grad(shared: bool):
        m.offset.grad = None
        g = m.deform() if shared else None
        verts = g.vertices if shared else m.vertices()
        normals = g.vertex_normals if shared else m.vertex_normals()
        loss = (verts * normals).sum() + 10 * m.laplacian_loss(g) + m.normal_consistency_loss(g)
        loss.backward()
        return loss.detach(), m.offset.grad.clone()

    (l1, g1), (l2, g2) = grad(True), grad(False)
    assert torch.equal(l1, l2)
    assert torch.allclose(g1, g2, rtol=1e-6, atol=1e-9) and g1.abs().max() > 0


def _masked_twin(vertices, faces, color_fn, cams, light, background):
    """render_mesh's steps 1-4 without anti-aliasing, written with boolean-mask indexing (the form that
    synchronises at every mask): the reference of the single covered-pixel list."""
    from dreamflow.render.raster import interpolate, rasterize
    from dreamflow.render.shading import light_directions, shade

    V, H, W = len(cams), cams.height, cams.width
    pos = clip_positions(vertices, cams)
    rast = rasterize(pos, faces, (H, W), backend="torch")
    covered = rast[..., 3] > 0
    xyz_n = interpolate(torch.cat([vertices, vertex_normals(vertices, faces)], 1), rast, faces, backend="torch")
    normal = torch.nn.functional.normalize(xyz_n[..., 3:], dim=-1) * covered.unsqueeze(-1)
    points = xyz_n[..., :3][covered]
    view = torch.arange(V).view(V, 1, 1).expand(V, H, W)[covered]
    color = shade(color_fn(points), normal[covered], light_directions(light.expand(V, 3)[view], points),
                  mode="lambertian")
    fg = points.new_zeros(V, H, W, 3).index_put((covered,), color)
    opacity = covered.unsqueeze(-1).to(fg.dtype)
    return fg + (1 - opacity) * background


def test_render_uses_one_covered_pixel_list_and_given_normals():
    """Gathering and scattering through one index list gives the boolean-mask twin's image and gradients
    bit for bit; passing the vertex normals changes nothing; wrong normals are refused."""
    v, f = uv_sphere(10, 16)
    cams = make_cameras([10.0, -20.0], [20.0, 150.0], 2.5, 40.0, 20, 24)
    light = torch.tensor([[3.0, 2.0, 1.0], [-2.0, 1.0, -3.0]])
    bg = torch.tensor([0.3, 0.4, 0.5])
    colour = ConstantColor((0.8, 0.5, 0.3))

    def run(fn):
        verts = v.clone().requires_grad_(True)
        colour.rgb.grad = None
        img = fn(verts)
        (img * torch.linspace(0, 1, img.numel()).view_as(img)).sum().backward()
        return img.detach(), verts.grad, colour.rgb.grad.clone()

    ours = run(lambda x: render_mesh(x, f, colour.albedo, cams, background=bg, light_positions=light,
                                     backend="torch", anti_alias=False)["rgb"])
    twin = run(lambda x: _masked_twin(x, f, colour.albedo, cams, light, bg))
    assert all(torch.equal(a, b) for a, b in zip(ours, twin))
    assert ours[1].abs().sum() > 0
    full = render_mesh(v, f, colour.albedo, cams, background=bg, light_positions=light, backend="torch")
    given = render_mesh(v, f, colour.albedo, cams, background=bg, light_positions=light, backend="torch",
                        normals=vertex_normals(v, f))
    assert all(torch.equal(full[k], given[k]) for k in full)
    with pytest.raises(DreamFlowError, match="normals have shape"):
        render_mesh(v, f, colour.albedo, cams, light_positions=light, normals=torch.zeros(3, 3), backend="torch")


def test_weld_keeps_first_occurrence_order_and_faces_or_drops_collapsed_ones():
    """One weld for imported meshes (collapsed faces dropped), the GLB turntable's anti-aliasing topology (every face
    kept in order: triangle ids index both lists) and the floater measure (positions compared at 6 decimals)."""
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1.0]])
    f = np.array([[0, 1, 2], [3, 2, 4], [1, 3, 4]])
    wv, wf = weld_positions(v, f, drop_collapsed=True)
    np.testing.assert_array_equal(wv, v[[0, 1, 2, 4]])
    np.testing.assert_array_equal(wf, [[0, 1, 2], [1, 2, 3]])
    kv, kf = weld_positions(v, f)
    np.testing.assert_array_equal(kv, wv)
    np.testing.assert_array_equal(kf, [[0, 1, 2], [1, 2, 3], [1, 1, 3]])  # the collapsed face stays, in place
    np.testing.assert_array_equal(kv[kf], v[f])  # every corner keeps its position
    same_v, same_f = weld_positions(v[:3], f[:1], drop_collapsed=True)  # nothing repeats: unchanged
    assert np.array_equal(same_v, v[:3]) and np.array_equal(same_f, f[:1])
    near = np.concatenate([v, v[:1] + 1e-8])  # a 6th vertex within rounding of vertex 0
    g = np.concatenate([f, [[5, 1, 2]]])
    assert len(weld_positions(near, g)[0]) == 5 and len(weld_positions(near, g, decimals=6)[0]) == 4
    np.testing.assert_array_equal(weld_positions(near, g, decimals=6)[1][-1], [0, 1, 2])
