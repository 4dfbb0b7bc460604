"""GPU twins (``-m gpu``, skipped without CUDA) of CPU tests whose subject also runs on the GPU: the occupancy
grid, the volume renderer, one update of each stage, the APFO target (eager and fast path).

Each twin runs the CPU test's computation on CUDA and checks it against the same brute-force reference or the CPU
result: lookups exactly, renders and gradients to float32 rounding (atol 1e-4; CUDA sums in other orders),
stages by what a CPU test asserts (finite logged losses, moved parameters, one log row per update) plus a
repeat with the same seed (atomic adds make CUDA runs agree to rounding, not bit for bit).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from test_fast_path import EXACT, rel
from test_occupancy import RENDER, CompactBall, _cameras, _centres, _covering_grid, _grads
from test_volume import Blob, reference_rays

from dreamflow.render.cameras import make_cameras
from dreamflow.render.occupancy import OccupancyConfig, OccupancyGrid
from dreamflow.render.volume import VolumeRenderConfig, render_volume

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]


def _ball_on(device):
    ball = CompactBall().to(device)
    ball.c = ball.c.to(device)  # a plain tensor attribute, not a buffer
    return ball


def _grid_on(grid: OccupancyGrid, device) -> OccupancyGrid:
    out = OccupancyGrid(grid.config, radius=grid.radius, device=device)
    out.binary = grid.binary.to(device)
    out.density = grid.density.to(device)
    return out


# ---------------------------------------------------------------------------------------------- occupancy grid
def test_occupancy_lookup_and_grid_render_on_cuda_match_cpu():
    """test_occupancy's lookup and 'covering grid == no grid' on CUDA, and both equal to the CPU render."""
    grid = OccupancyGrid(OccupancyConfig(resolution=5), radius=1.5)
    grid.binary = torch.rand(125, generator=torch.Generator().manual_seed(1)) < 0.5
    pts = (torch.rand(400, 3, generator=torch.Generator().manual_seed(2)) * 2 - 1) * 1.8
    assert torch.equal(_grid_on(grid, "cuda").occupied(pts.cuda()).cpu(), grid.occupied(pts))

    results = {}
    for device in ("cpu", "cuda"):
        ball = _ball_on(device)
        covering = _grid_on(_covering_grid(CompactBall()), device)
        for occ in (None, covering):
            ball.zero_grad()
            out = render_volume(ball, (0.2, 0.4, 0.9), _cameras().to(device), RENDER, shading="lambertian",
                                occupancy=occ)
            (out["rgb"] * torch.linspace(0, 1, 3, device=device)).sum().backward()
            results[device, occ is not None] = ({k: out[k].detach().cpu() for k in ("rgb", "opacity", "depth")},
                                                {k: v.cpu() for k, v in _grads(ball).items()})
    ref_out, ref_grads = results["cpu", False]
    assert ref_out["opacity"].max() > 0.5  # the ball is seen
    for key in (("cuda", False), ("cuda", True)):
        out, grads = results[key]
        for k in ref_out:
            torch.testing.assert_close(out[k], ref_out[k], atol=1e-4, rtol=1e-4, msg=f"{key} {k}")
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-4, rtol=1e-4, msg=f"{key} grad {k}")


def test_occupancy_grid_built_on_cuda_marks_the_blob_and_not_the_corners():
    """test_grid_marks_the_blob_and_not_the_corners with the grid refreshed on CUDA (draws on the device)."""
    ball = _ball_on("cuda")
    grid = OccupancyGrid.from_field(ball, OccupancyConfig(resolution=16),
                                    torch.Generator(device="cuda").manual_seed(0))
    assert grid.binary.device.type == "cuda"
    centres = _centres(grid)
    dist = (centres - ball.c).norm(dim=-1)
    h = 2.0 / 16
    half_diag = h * 3 ** 0.5 / 2
    far_sigma = 12.0 * torch.relu(1 - (dist + half_diag) ** 2 / 0.45 ** 2) ** 2
    assert (far_sigma * grid.step_size > 0.01).sum() > 20
    assert grid.binary[far_sigma * grid.step_size > 0.01].all()
    assert not grid.binary[dist - half_diag > 0.45].any()
    corners = (centres.abs() > 1 - h).all(-1)
    assert not grid.binary[corners].any()
    assert 0.02 < grid.fraction_occupied() < 0.1


# ---------------------------------------------------------------------------------------------- volume renderer
def test_volume_renderer_on_cuda_matches_per_ray_loop_forward_and_backward():
    """test_volume's per-ray reference, fed the CUDA render's sample distances, forward and parameter gradients."""
    field = Blob().cuda()
    cams = make_cameras([10.0, -20.0], [30.0, 200.0], 2.2, 45.0, 12, 12).to("cuda")
    bg = (0.9, 0.8, 0.7)
    cfg = VolumeRenderConfig(n_samples=24, n_importance=24, empty_ray_opacity=0.0)
    out = render_volume(field, bg, cams, cfg, generator=torch.Generator(device="cuda").manual_seed(3))
    assert out["rgb"].device.type == "cuda"
    pixels = out["ray_index"].cpu()[torch.randperm(out["ray_index"].numel(),
                                                   generator=torch.Generator().manual_seed(1))[:8]].tolist()
    cpu_field = Blob()
    cpu_field.load_state_dict({k: v.cpu() for k, v in field.state_dict().items()})
    cpu_out = {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in out.items()}
    rgb_ref, opa_ref, depth_ref = reference_rays(cpu_field, cams.to("cpu"), cpu_out, pixels, bg)
    flat = lambda x, c: x.reshape(-1, c)[pixels]  # noqa: E731
    torch.testing.assert_close(flat(out["rgb"], 3).cpu(), rgb_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(flat(out["opacity"], 1)[:, 0].cpu(), opa_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(flat(out["depth"], 1)[:, 0].cpu(), depth_ref, atol=1e-4, rtol=1e-4)
    assert opa_ref.max() > 0.5
    G = torch.randn(len(pixels), 3, generator=torch.Generator().manual_seed(2))
    field.zero_grad()
    (flat(out["rgb"], 3) * G.cuda()).sum().backward()
    cpu_field.zero_grad()
    (rgb_ref * G).sum().backward()
    for (name, a), b in zip(field.named_parameters(), cpu_field.parameters()):
        torch.testing.assert_close(a.grad.cpu(), b.grad, atol=1e-4, rtol=1e-3, msg=name)
    assert sum(float(q.grad.abs().sum()) for q in cpu_field.parameters()) > 0


# ---------------------------------------------------------------------------------------------- stages
@pytest.fixture(scope="module")
def cuda_sd(tiny_sd_path):
    from dreamflow.denoisers import Denoiser

    return Denoiser.load(tiny_sd_path, dtype="fp32", device="cuda")


def _nerf_update(den, seed=0):
    from test_stages import PROMPT, nerf_cfg

    from dreamflow.stages import run_nerf_stage

    return run_nerf_stage(den, PROMPT, "blurry", nerf_cfg(iterations=1, seed=seed))


def _close_states(a, b, tol=1e-3):
    sa, sb = a.field.state_dict(), b.field.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if sa[k].is_floating_point():
            r = rel(sa[k].float().cpu(), sb[k].float().cpu())
            assert r <= tol or float(sb[k].abs().max()) == 0, f"same seed, other state: {k} rel {r:.3g} > {tol}"


def test_each_stage_updates_on_cuda(cuda_sd, tiny_refiner_path):
    """The stages on CUDA (1 NeRF update; 2 mesh and 2 refine updates, as test_stages): finite losses, moved
    parameters, the input state untouched, and the same seed repeats."""
    from test_stages import PROMPT, mesh_cfg, nerf_cfg

    from dreamflow.denoisers import Denoiser
    from dreamflow.scene.nerf import NeRFField
    from dreamflow.seeding import seeded
    from dreamflow.stages import (ExtractConfig, MeshStageConfig, RefineConfig, extract_mesh_state, run_mesh_stage,
                                  run_refine_stage)

    nerf = _nerf_update(cuda_sd)
    assert next(nerf.field.parameters()).device.type == "cuda"
    assert [r["step"] for r in nerf.guidance_log] == [0] and all(
        torch.isfinite(torch.tensor(r["loss"])) for r in nerf.guidance_log), f"NeRF log {nerf.guidance_log}"
    with seeded(0):
        init = NeRFField(nerf_cfg().nerf)
    moved = [k for k, v in init.state_dict().items() if not torch.equal(v, nerf.field.state_dict()[k].cpu())]
    assert any("encoding" in k for k in moved) and any("network" in k for k in moved), f"NeRF moved only {moved}"
    _close_states(_nerf_update(cuda_sd), nerf)

    # stages 2 and 3 as test_stages runs them (2 updates: stage 3's first update at t 0.3 leaves the colour as is)
    mesh = extract_mesh_state(nerf, ExtractConfig(resolution=32))
    assert mesh.faces.shape[0] > 0, "extraction gave no faces"
    before = mesh.field.encoding.params.detach().clone()
    rows = lambda s, stage: [r for r in s.guidance_log if r["stage"] == stage]  # noqa: E731  (the log accumulates)
    # No textureless updates: a textureless render has no colour, so the colour field gets no gradient. On CUDA the
    # background's colours come from a device generator, so the host generator's draws differ from the CPU run's:
    # with the default mix both updates drew "textureless" there and the colour could not move (GPU run, 2026-12-07).
    shading = dataclasses.replace(MeshStageConfig().shading, albedo_prob=0.5, textureless_prob=0.0)
    mesh2 = run_mesh_stage(cuda_sd, mesh, PROMPT, "blurry", mesh_cfg(shading=shading))
    assert len(rows(mesh2, "MeshStage")) == 2 and all(torch.isfinite(torch.tensor(r["loss"]))
                                                      for r in rows(mesh2, "MeshStage")), f"mesh log {mesh2.guidance_log}"
    assert float((mesh2.vertices - mesh.vertices).abs().max()) > 0, "mesh stage: vertices did not move"
    assert not torch.equal(mesh2.field.encoding.params, mesh.field.encoding.params), "mesh stage: colour did not move"
    assert torch.equal(mesh.field.encoding.params, before) and mesh2.history[-1] == "MeshStage", \
        f"mesh stage changed its input or history {mesh2.history}"
    again = run_mesh_stage(cuda_sd, mesh, PROMPT, "blurry", mesh_cfg(shading=shading))
    r_again = rel(again.vertices.float().cpu(), mesh2.vertices.float().cpu())
    assert r_again <= 1e-3, f"mesh stage repeat: vertices rel {r_again:.3g} > 1e-3"

    refiner = Denoiser.load(tiny_refiner_path, dtype="fp32", device="cuda")
    # the same shading mix as above, for the same reason (the refine stage's default mix drew textureless twice)
    refined = run_refine_stage(refiner, mesh2, PROMPT, "blurry", mesh_cfg(RefineConfig, shading=shading))
    assert len(rows(refined, "SDXLRefine")) == 2 and all(torch.isfinite(torch.tensor(r["loss"]))
                                                         for r in rows(refined, "SDXLRefine")), \
        f"refine log {refined.guidance_log}"
    assert torch.equal(refined.vertices, mesh2.vertices), "stage 3 keeps the geometry by default"
    assert not torch.equal(refined.field.encoding.params, mesh2.field.encoding.params), "refine: colour did not move"
    assert refined.history[-1] == "SDXLRefine", f"refine history {refined.history}"


# ---------------------------------------------------------------------------------------------- APFO target
@pytest.mark.parametrize("fast", [False, True])
def test_apfo_target_on_cuda_matches_formula(tiny_sd_path, fast):
    """test_guidance's APFO formula on CUDA (noise from the guidance's CUDA generator), eager in float32, and with
    the graphed CFG call (fast path, float16) against the same formula from eager calls of that denoiser."""
    from test_guidance import _Spy

    from dreamflow.denoisers import Denoiser
    from dreamflow.guidance import GuidanceConfig, make_guidance

    den = Denoiser.load(tiny_sd_path, dtype="fp16" if fast else "fp32", device="cuda")
    cfg = GuidanceConfig(method="apfo", cfg_scale=3.0, t_start=0.9, t_end=0.1, updates_per_t=2)
    g = make_guidance(den, cfg, total_updates=8, seed=3)
    g.close()
    g.scene = _Spy(lambda x_t, t: 0.25 * x_t, den)
    n = den.native_resolution // den.vae_scale_factor
    x = torch.randn(2, den.latent_channels, n, n, generator=torch.Generator().manual_seed(0)).cuda()
    x.requires_grad_(True)
    embeds = den.encode_prompt(["a red cube, front view", "a red cube, side view"])
    cam = torch.eye(4, device="cuda").flatten().expand(2, 16)
    if fast:
        den.enable_fast_path(EXACT)
    out = g(x, embeds, cam, 5)
    if fast:
        assert den.fast_path.stats()["unet_replays"] + den.fast_path.stats()["unet_captures"] >= 1
        den.disable_fast_path()
    t_i, t_next = g.schedule.at(5)
    eps = torch.randn(x.shape, generator=torch.Generator(device="cuda").manual_seed(3), device="cuda")
    t = torch.full((2,), t_i, device="cuda")
    with torch.no_grad():
        x_t = den.add_noise(x.detach(), eps, t)
        eps_pre = den.predict_eps(x_t, t, embeds, 3.0)
    sigma_i, sigma_next = den.sigma(t), den.sigma(torch.full((2,), t_next, device="cuda"))
    x_hat = x.detach() - (sigma_i - sigma_next).view(2, 1, 1, 1) * (eps_pre - 0.25 * x_t)
    if fast:
        assert rel(out.target.float(), x_hat.float()) <= 1e-3
    else:
        torch.testing.assert_close(out.target, x_hat, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.loss, 0.5 * (x.detach() - x_hat).pow(2).sum() / 2, rtol=1e-4, atol=1e-4)
    out.loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert len(g.scene.calls) == 1 and torch.allclose(g.scene.calls[0].float(), t.float())


# ------------------------------------------------------------------------------- analytic normals, compiled grid
def test_analytic_normals_under_a_graph_on_cuda_match_the_uncompiled_grid():
    """Shaded NeRF renders (lambertian / textureless) differentiate the normals (create_graph=True). A compiled hash
    grid's backward is not twice differentiable (torch.compile: "donated buffers" error), so the grid runs its
    torch path uncompiled there; the loss gradients equal those of a field with compile off."""
    import dataclasses

    from dreamflow.scene.hashgrid import HashGridConfig
    from dreamflow.scene.nerf import NeRFField, NeRFFieldConfig

    grads, weights = [], None
    pts = (torch.rand(4096, 3, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.6).cuda()
    for compile_grid in (True, False):
        grid = dataclasses.replace(HashGridConfig(n_levels=8, log2_hashmap_size=15), backend="torch",
                                   compile=compile_grid)
        field = NeRFField(NeRFFieldConfig(grid=grid), generator=torch.Generator().manual_seed(1))
        if weights is None:  # one set of weights for both fields (the MLPs draw from the global stream)
            with torch.no_grad():
                p = field.encoding.params
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.5)
            weights = {k: v.clone() for k, v in field.state_dict().items()}
        field.load_state_dict(weights)
        field = field.cuda()
        field(pts)  # an ordinary forward first: builds the compiled functions where compile is on
        out = field(pts, need_normal=True)
        loss = (out["normal"][:, 1] ** 2).mean() + out["density"].mean()
        loss.backward()
        grads.append(field.encoding.params.grad.clone())
    assert grads[0].abs().max() > 0
    assert rel(grads[0], grads[1]) < 1e-3, rel(grads[0], grads[1])
