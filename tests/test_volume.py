"""Volume renderer vs analytic compositing and a per-ray loop twin; NeRF field, background, shading, losses."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dreamflow.errors import DreamFlowError
from dreamflow.render.cameras import make_cameras
from dreamflow.render.shading import ShadingConfig, pick_mode, random_light, shade
from dreamflow.render.volume import (VolumeRenderConfig, opaque_loss, orientation_loss, render_volume,
                                     sparsity_loss)
from dreamflow.scene.hashgrid import HashGridConfig
from dreamflow.scene.nerf import Background, BackgroundConfig, NeRFField, NeRFFieldConfig

TINY_GRID = HashGridConfig(n_levels=4, n_features_per_level=2, log2_hashmap_size=12, base_resolution=4,
                           per_level_scale=2.0, backend="torch")


class ConstantSphere(nn.Module):
    """sigma = s inside |x| < r, 0 outside; constant albedo; radial normals."""

    def __init__(self, r=0.5, sigma=3.0):
        super().__init__()
        self.r, self.sigma = r, sigma
        self.colour = torch.tensor([0.2, 0.5, 0.8])

    def density(self, p):
        return torch.where(p.norm(dim=-1) < self.r, torch.full_like(p[:, 0], self.sigma), torch.zeros_like(p[:, 0]))

    def forward(self, p, need_normal=False):
        out = {"density": self.density(p), "albedo": self.colour.expand(p.shape[0], 3)}
        if need_normal:
            out["normal"] = F.normalize(p, dim=-1)
        return out


class Blob(nn.Module):
    """Smooth learnable field: sigma = a exp(-|x - c|^2 / s^2), albedo = sigmoid(x W + b)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(8.0))
        self.c = nn.Parameter(torch.tensor([0.1, -0.05, 0.0]))
        self.s = nn.Parameter(torch.tensor(0.35))
        self.W = nn.Parameter(torch.tensor([[1.0, -0.5, 0.2], [0.3, 1.0, -0.4], [-0.2, 0.1, 1.5]]))
        self.b = nn.Parameter(torch.tensor([0.1, -0.2, 0.3]))

    def density(self, p):
        return self.a * torch.exp(-((p - self.c) ** 2).sum(-1) / self.s ** 2)

    def forward(self, p, need_normal=False):
        out = {"density": self.density(p), "albedo": torch.sigmoid(p @ self.W + self.b)}
        if need_normal:
            out["normal"] = F.normalize(p - self.c, dim=-1)  # -grad sigma direction
        return out


def _front_cameras(n=2, size=33, distance=2.0, fovy=40.0):
    return make_cameras(0.0, torch.arange(n) * 90.0, distance, fovy, size, size)


# ----------------------------------------------------------------------------------------------
# Renderer vs analytic compositing
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stratified,tol", [(False, 2e-3), (True, 1e-2)])
def test_sphere_centre_ray_opacity_and_depth(stratified, tol):
    sigma, r, dist = 3.0, 0.5, 2.0
    cams = _front_cameras(2, 33, dist)
    out = render_volume(ConstantSphere(r, sigma), (1.0, 1.0, 1.0), cams,
                        VolumeRenderConfig(n_samples=64, n_importance=64, stratified=stratified),
                        generator=torch.Generator().manual_seed(0))
    L, t0 = 2 * r, dist - r  # chord and entry distance of the centre ray
    e = 1 - math.exp(-sigma * L)
    expected_depth = t0 * e + e / sigma - L * math.exp(-sigma * L)  # int_0^L (t0 + s) sigma e^{-sigma s} ds
    for v in range(2):  # batched views see the same centre ray
        assert out["opacity"][v, 16, 16, 0].item() == pytest.approx(e, abs=tol)
        assert out["depth"][v, 16, 16, 0].item() == pytest.approx(expected_depth, abs=3 * tol)
        colour = torch.tensor([0.2, 0.5, 0.8]) * e + (1 - e)
        torch.testing.assert_close(out["rgb"][v, 16, 16], colour, atol=tol, rtol=0)
    assert out["rgb"].shape == (2, 33, 33, 3) and out["opacity"].shape == (2, 33, 33, 1)
    assert out["normal"] is None and out["depth"].shape == (2, 33, 33, 1)


def test_missed_rays_show_background():
    cams = _front_cameras(1, 33, distance=2.0, fovy=90.0)  # wide: corners miss the [-1, 1]^3 box
    bg = (0.3, 0.6, 0.9)
    out = render_volume(ConstantSphere(), bg, cams, VolumeRenderConfig(stratified=False))
    corner = out["rgb"][0, 0, 0]
    assert corner.tolist() == pytest.approx(list(bg))
    assert out["opacity"][0, 0, 0, 0] == 0
    # a pixel inside the box but outside the sphere: skipped as empty, background only
    o, d = cams.rays()
    rendered = torch.zeros(33 * 33, dtype=torch.bool)
    rendered[out["ray_index"]] = True
    assert not rendered[0]  # the corner ray was never sampled
    assert out["opacity"][0, 16, 2, 0] == 0 and out["rgb"][0, 16, 2].tolist() == pytest.approx(list(bg))
    # every rendered ray hits the sphere
    assert out["ray_index"].numel() > 0 and (out["opacity"].view(-1)[out["ray_index"]] > 0).all()


def _slab(o, d, r):
    """Scalar ray-box entry/exit, written independently of the renderer."""
    lo, hi = -math.inf, math.inf
    for k in range(3):
        if abs(d[k]) < 1e-12:
            continue
        a, b = (-r - o[k]) / d[k], (r - o[k]) / d[k]
        lo, hi = max(lo, min(a, b)), min(hi, max(a, b))
    return max(lo, 0.0), hi


def reference_rays(field, cams, out, pixels, bg):
    """Per-ray loop: the renderer's sample distances, everything else recomputed one sample at a time."""
    o, d = (x.reshape(-1, 3) for x in cams.rays())
    row_of = {int(p): k for k, p in enumerate(out["ray_index"])}
    rgbs, opas, depths = [], [], []
    for p in pixels:
        k = row_of[p]
        t = out["t"][k].detach()
        near, far = _slab(o[p].tolist(), d[p].tolist(), 1.0)
        edges = [near] + [0.5 * (float(t[i]) + float(t[i + 1])) for i in range(len(t) - 1)] + [far]
        pts = o[p] + d[p] * t[:, None]
        f = field(pts)
        trans, rgb, opa, depth = 1.0, torch.zeros(3), 0.0, 0.0
        for i in range(len(t)):
            alpha = 1 - torch.exp(-f["density"][i] * (edges[i + 1] - edges[i]))
            w = trans * alpha
            rgb, opa, depth = rgb + w * f["albedo"][i], opa + w, depth + w * t[i]
            trans = trans * (1 - alpha)
        rgbs.append(rgb + (1 - opa) * torch.tensor(bg))
        opas.append(opa)
        depths.append(depth)
    return torch.stack(rgbs), torch.stack(opas), torch.stack(depths)


def test_renderer_matches_per_ray_loop_forward_and_backward():
    field = Blob()
    cams = make_cameras([10.0, -20.0], [30.0, 200.0], 2.2, 45.0, 12, 12)
    bg = (0.9, 0.8, 0.7)
    cfg = VolumeRenderConfig(n_samples=24, n_importance=24, empty_ray_opacity=0.0)
    out = render_volume(field, bg, cams, cfg, generator=torch.Generator().manual_seed(3))
    pixels = out["ray_index"][torch.randperm(out["ray_index"].numel(), generator=torch.Generator().manual_seed(1))[:8]].tolist()
    rgb_ref, opa_ref, depth_ref = reference_rays(field, cams, out, pixels, bg)
    flat = lambda x, c: x.reshape(-1, c)[pixels]  # noqa: E731
    torch.testing.assert_close(flat(out["rgb"], 3), rgb_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flat(out["opacity"], 1)[:, 0], opa_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flat(out["depth"], 1)[:, 0], depth_ref, atol=1e-5, rtol=1e-5)
    assert opa_ref.max() > 0.5  # the comparison covers opaque rays, not just empty ones
    # backward: the same loss through both paths gives the same parameter gradients
    G = torch.randn(len(pixels), 3, generator=torch.Generator().manual_seed(2))
    grads = []
    for rgb in (flat(out["rgb"], 3), rgb_ref):
        field.zero_grad()
        (rgb * G).sum().backward(retain_graph=True)
        grads.append([q.grad.clone() for q in field.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert sum(g.abs().sum() for g in grads[0]) > 0


def test_empty_ray_skip_changes_little():
    field = Blob()
    with torch.no_grad():
        field.s.fill_(0.2)  # density < 1e-6 beyond 0.8 from the centre: the outer rays are empty
    cams = _front_cameras(1, 16, fovy=60.0)
    a = render_volume(field, 1.0, cams, VolumeRenderConfig(stratified=False, empty_ray_opacity=0.0))
    b = render_volume(field, 1.0, cams, VolumeRenderConfig(stratified=False, empty_ray_opacity=1e-4))
    assert b["ray_index"].numel() < a["ray_index"].numel()  # some rays were skipped...
    assert (a["rgb"] - b["rgb"]).abs().max() < 1e-3  # ...at a cost bounded by the threshold (+ resampling)


def test_shaded_render_uses_normals_and_light():
    field = ConstantSphere(sigma=50.0)
    cams = _front_cameras(1, 17)
    light = cams.position * 2  # headlight: the centre of the sphere faces the light
    out = render_volume(field, 0.0, cams, VolumeRenderConfig(stratified=False), shading="textureless",
                        light_positions=light)
    centre = out["rgb"][0, 8, 8]
    assert centre.tolist() == pytest.approx([1.0, 1.0, 1.0], abs=2e-2)  # k_a + k_d (n . l = 1), opaque
    rim = out["rgb"][0, 8, 3]  # near the silhouette n . l is small -> darker
    assert rim[0] < centre[0] - 0.2
    n = out["normal"][0, 8, 8] / out["opacity"][0, 8, 8]
    assert n.tolist() == pytest.approx([0.0, 0.0, 1.0], abs=2e-2)  # world normal faces the +Z camera
    assert out["sample_normal"].shape == out["weights"].shape + (3,)


# ----------------------------------------------------------------------------------------------
# NeRF field, background
# ----------------------------------------------------------------------------------------------
def _tiny_field(normal="analytic", seed=0):
    return NeRFField(NeRFFieldConfig(grid=TINY_GRID, normal=normal), generator=torch.Generator().manual_seed(seed))


def test_nerf_field_blob_init_and_outputs():
    torch.manual_seed(0)
    field = _tiny_field()
    r = torch.linspace(0.0, 0.95, 20)
    pts = torch.stack([r, torch.zeros_like(r), torch.zeros_like(r)], -1)
    sigma = field.density(pts)
    assert sigma.shape == (20,)
    # grid features start at ~1e-4, so sigma ~ softplus(10 (1 - |x| / 0.5)) (threestudio blob_magic3d)
    expected = F.softplus(10 * (1 - r / 0.5))
    torch.testing.assert_close(sigma, expected, atol=1e-2, rtol=1e-2)
    assert (sigma[1:] < sigma[:-1]).all()
    out = field(torch.rand(50, 3) * 2 - 1, need_normal=True)
    assert out["albedo"].shape == (50, 3) and out["albedo"].min() >= 0 and out["albedo"].max() <= 1
    assert out["normal"].norm(dim=-1).sub(1).abs().max() < 1e-5


def test_fp16_mlp_option_leaves_cpu_float32_and_unchanged():
    pts = torch.rand(40, 3, generator=torch.Generator().manual_seed(3)) * 2 - 1
    outs = []
    for fp16 in (True, False):
        torch.manual_seed(0)
        outs.append(NeRFField(NeRFFieldConfig(grid=TINY_GRID, mlp_fp16=fp16))(pts, need_normal=True))
    for k in ("density", "albedo", "normal"):
        assert outs[0][k].dtype == torch.float32 and torch.equal(outs[0][k], outs[1][k]), k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 MLPs run on CUDA tensors only")
def test_fp16_mlp_on_cuda_close_to_float32():
    pts = (torch.rand(4096, 3, generator=torch.Generator().manual_seed(3)) * 2 - 1).cuda()
    outs = []
    for fp16 in (True, False):
        torch.manual_seed(0)
        outs.append(NeRFField(NeRFFieldConfig(grid=TINY_GRID, mlp_fp16=fp16)).cuda()(pts))
    assert outs[0]["density"].dtype == torch.float32
    torch.testing.assert_close(outs[0]["density"], outs[1]["density"], atol=2e-2, rtol=1e-2)  # fp16: ~3 digits
    torch.testing.assert_close(outs[0]["albedo"], outs[1]["albedo"], atol=2e-3, rtol=1e-2)


def test_normals_radial_and_analytic_matches_finite_difference():
    pts = F.normalize(torch.randn(64, 3, generator=torch.Generator().manual_seed(1)), dim=-1) * 0.4
    n_a = _tiny_field("analytic").normal(pts)
    n_fd = _tiny_field("finite_difference").normal(pts)  # same seed -> same parameters
    radial = F.normalize(pts, dim=-1)
    assert (n_a * radial).sum(-1).min() > 0.99  # the blob's outward normal
    assert (n_a * n_fd).sum(-1).min() > 0.999


def test_orientation_loss_backpropagates_through_analytic_normals():
    field = _tiny_field()
    cams = _front_cameras(1, 12)
    out = render_volume(field, 0.5, cams, VolumeRenderConfig(n_samples=16, n_importance=16), need_normal=True,
                        generator=torch.Generator().manual_seed(0))
    loss = orientation_loss(out["weights"], out["sample_normal"], out["ray_dirs"]) + out["rgb"].mean()
    loss.backward()  # needs the double backward of the hash grid + MLP
    assert field.encoding.params.grad.abs().sum() > 0
    assert all(p.grad is not None for p in field.density_network.parameters())


def test_param_groups_cover_every_parameter_once():
    field = _tiny_field()
    groups = field.param_groups()
    assert [g["lr"] for g in groups] == [1e-2, 1e-3]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in field.parameters()) and len(ids) == len(set(ids))
    torch.optim.Adam(groups + Background().param_groups())  # valid optimiser groups


def test_render_nerf_field_end_to_end_gradients():
    field, background = _tiny_field(), Background()
    cams = _front_cameras(2, 16, distance=2.5)
    out = render_volume(field, background, cams, VolumeRenderConfig(n_samples=16, n_importance=16),
                        shading="lambertian", light_positions=random_light(cams, torch.Generator().manual_seed(0)),
                        generator=torch.Generator().manual_seed(0))
    rgb = out["rgb"]
    assert rgb.shape == (2, 16, 16, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert out["opacity"][:, 8, 8].min() > 0.99  # the blob is opaque at the centre
    assert out["opacity"][:, 0, 0].max() < 0.05
    rgb.mean().backward()
    assert field.encoding.params.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in background.parameters())


def test_background_random_aug_and_solid():
    bg = Background(BackgroundConfig(random_aug=True, random_aug_prob=1.0))
    dirs = F.normalize(torch.randn(3, 4, 5, 3), dim=-1)
    bg.eval()
    a = bg(dirs)
    assert a.shape == (3, 4, 5, 3) and 0 < a.min() and a.max() < 1
    bg.train()
    b = bg(dirs, generator=torch.Generator().manual_seed(0))
    flat = b.reshape(3, -1, 3)
    assert (flat == flat[:, :1]).all()  # one solid colour per view
    assert not torch.equal(flat[0, 0], flat[1, 0])
    never = Background(BackgroundConfig(random_aug=True, random_aug_prob=0.0))
    never.train()
    torch.testing.assert_close(never(dirs), never.eval()(dirs))
    assert bg(dirs, solid=(1.0, 0.0, 0.5))[1, 2, 3].tolist() == [1.0, 0.0, 0.5]
    # the solid colours come from the generator's own stream (same seed, same colours; drawn on its device)
    again = bg(dirs, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, b)
    g = torch.Generator().manual_seed(0)
    torch.rand(3, generator=g)  # the per-view "replace" coins come first
    colour = torch.rand(3, 3, generator=g)
    assert torch.equal(flat[:, 0], colour)


# ----------------------------------------------------------------------------------------------
# Shading and regularisers
# ----------------------------------------------------------------------------------------------
def test_shade_modes():
    albedo = torch.tensor([[0.5, 0.2, 1.0]]).expand(3, 3)
    normal = torch.tensor([[0.0, 0.0, 1.0]]).expand(3, 3)
    light = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [0.6, 0.0, 0.8]])
    lam = shade(albedo, normal, light, 0.1, 0.9, "lambertian")
    torch.testing.assert_close(lam[0], albedo[0] * 1.0)  # n . l = 1
    torch.testing.assert_close(lam[1], albedo[0] * 0.1)  # facing away: ambient only
    torch.testing.assert_close(lam[2], albedo[0] * (0.1 + 0.9 * 0.8))
    tl = shade(None, normal, light, 0.1, 0.9, "textureless")
    torch.testing.assert_close(tl[:, 0], torch.tensor([1.0, 0.1, 0.82]))
    assert tl.shape == (3, 3) and (tl[:, 0] == tl[:, 2]).all()
    assert shade(albedo, None, None, mode="albedo") is albedo
    # broadcasting a single light over an image
    img = shade(torch.rand(2, 4, 4, 3), F.normalize(torch.randn(2, 4, 4, 3), dim=-1), torch.tensor([0.0, 1.0, 0.0]))
    assert img.shape == (2, 4, 4, 3)
    with pytest.raises(DreamFlowError, match="shading mode 'phong'"):
        shade(albedo, normal, light, mode="phong")


def test_pick_mode_frequencies():
    cfg = ShadingConfig()
    g = torch.Generator().manual_seed(0)
    assert pick_mode(cfg, step=10, generator=g) == "albedo"  # ambient-only warm-up
    modes = [pick_mode(cfg, step=5000, generator=g) for _ in range(4000)]
    for mode, p in (("albedo", 0.25), ("textureless", 0.375), ("lambertian", 0.375)):
        assert modes.count(mode) / 4000 == pytest.approx(p, abs=0.03)


def test_random_light_near_camera():
    cams = make_cameras(torch.zeros(200), torch.linspace(-180, 180, 200), 3.0, 45.0, 8, 8)
    lights = random_light(cams, torch.Generator().manual_seed(0))
    dist = lights.norm(dim=-1)
    assert dist.min() >= 0.8 and dist.max() <= 1.5
    cos = (F.normalize(lights, dim=-1) * F.normalize(cams.position, dim=-1)).sum(-1)
    assert cos.mean() > 0.85 and cos.min() > 0.0  # jittered around the camera direction


def test_regularisers():
    w = torch.tensor([[0.5, 0.3], [0.0, 0.0]])
    d = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, -1.0]])
    towards = torch.tensor([0.0, 0.0, 1.0]).expand(2, 2, 3)
    assert orientation_loss(w, towards, d).item() == 0.0  # normals face the camera
    away = -towards
    # (0.5 + 0.3) * 1^2 over the one ray with opacity > 0
    assert orientation_loss(w, away, d).item() == pytest.approx(0.8)
    assert sparsity_loss(torch.zeros(4)).item() == pytest.approx(0.1)
    assert sparsity_loss(torch.ones(4)).item() == pytest.approx(math.sqrt(1.01))
    assert opaque_loss(torch.tensor([0.0, 1.0])) < opaque_loss(torch.tensor([0.5, 0.5]))


def test_bad_render_config_errors():
    with pytest.raises(DreamFlowError, match="n_samples=1"):
        render_volume(ConstantSphere(), 0.0, _front_cameras(1, 4), VolumeRenderConfig(n_samples=1))
    with pytest.raises(DreamFlowError, match="shading 'toon'"):
        render_volume(ConstantSphere(), 0.0, _front_cameras(1, 4), shading="toon")
