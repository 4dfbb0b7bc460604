"""Occupancy grid: cell lookup vs a per-point loop, EMA-max refresh vs its formula, and render_volume with a grid
vs without it (exact where the grid covers all density), field calls only on occupied samples, the NeRF stage."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dreamflow.errors import DreamFlowError
from dreamflow.render.cameras import make_cameras
from dreamflow.render.occupancy import OccupancyConfig, OccupancyGrid
from dreamflow.render.volume import VolumeRenderConfig, render_volume
from dreamflow.scene.hashgrid import HashGridConfig
from dreamflow.scene.nerf import NeRFField, NeRFFieldConfig

TINY_GRID = HashGridConfig(n_levels=4, n_features_per_level=2, log2_hashmap_size=12, base_resolution=4,
                           per_level_scale=2.0, backend="torch")
RENDER = VolumeRenderConfig(n_samples=24, n_importance=16, stratified=False)


class CompactBall(nn.Module):
    """Learnable smooth field that is exactly 0 outside the ball |x - c| >= s: sigma = a (1 - |x - c|^2 / s^2)_+^2."""

    def __init__(self, s=0.45):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(12.0))
        self.c = torch.tensor([0.1, -0.05, 0.05])
        self.s = s
        self.W = nn.Parameter(torch.tensor([[1.0, -0.5, 0.2], [0.3, 1.0, -0.4], [-0.2, 0.1, 1.5]]))
        self.calls = 0

    def density(self, p):
        self.calls += p.shape[0]
        return self.a * F.relu(1 - ((p - self.c) ** 2).sum(-1) / self.s ** 2) ** 2

    def forward(self, p, need_normal=False):
        out = {"density": self.density(p), "albedo": torch.sigmoid(p @ self.W)}
        if need_normal:
            out["normal"] = F.normalize(p - self.c, dim=-1)
        return out


class VoxelField(nn.Module):
    """Nearest-cell table on the same R^3 layout as the occupancy grid: each sample touches one parameter row."""

    def __init__(self, R=8, radius=1.0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.R, self.radius = R, radius
        self.raw = nn.Parameter(torch.randn(R ** 3, generator=g))
        self.rgb = nn.Parameter(torch.randn(R ** 3, 3, generator=g))
        self.points = []

    def cell(self, p):
        ijk = ((p + self.radius) * (self.R / (2 * self.radius))).floor().long().clamp(0, self.R - 1)
        return (ijk[:, 0] * self.R + ijk[:, 1]) * self.R + ijk[:, 2]

    def density(self, p):
        self.points.append(p.detach().clone())
        return F.softplus(self.raw[self.cell(p)] + 1.0)

    def forward(self, p, need_normal=False):
        return {"density": self.density(p), "albedo": torch.sigmoid(self.rgb[self.cell(p)])}


def _cameras(n=3, size=20):
    return make_cameras(torch.tensor([10.0, 30.0, -5.0])[:n], torch.arange(n) * 120.0, 2.2, 45.0, size, size)


def _centres(grid):
    R, r = grid.config.resolution, grid.radius
    return (grid._coords.float() + 0.5) * (2 * r / R) - r  # [R^3, 3]


def _covering_grid(ball, R=16):
    """Grid whose occupied cells are exactly those meeting the ball (closest cell point within s)."""
    grid = OccupancyGrid(OccupancyConfig(resolution=R), radius=1.0)
    h = 2.0 / R
    lo = grid._coords.float() * h - 1.0
    closest = torch.maximum(lo, torch.minimum(ball.c, lo + h))
    grid.binary = (closest - ball.c).norm(dim=-1) < ball.s
    return grid


def _grads(module):
    return {k: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for k, p in module.named_parameters()}


# ---------------------------------------------------------------------------------------------- grid
def test_occupied_lookup_matches_per_point_loop():
    grid = OccupancyGrid(OccupancyConfig(resolution=5), radius=1.5)
    grid.binary = torch.rand(125, generator=torch.Generator().manual_seed(1)) < 0.5
    pts = (torch.rand(400, 3, generator=torch.Generator().manual_seed(2)) * 2 - 1) * 1.8  # some outside the box
    got = grid.occupied(pts)
    for p, g in zip(pts.tolist(), got.tolist()):
        if any(abs(c) >= 1.5 for c in p):
            assert g is False
            continue
        i, j, k = (min(int(math.floor((c + 1.5) / 0.6)), 4) for c in p)
        assert g == bool(grid.binary[(i * 5 + j) * 5 + k])
    assert grid.mark_all_occupied().occupied(pts[(pts.abs() < 1.5).all(-1)]).all()


def test_grid_marks_the_blob_and_not_the_corners():
    ball = CompactBall(s=0.45)
    grid = OccupancyGrid.from_field(ball, OccupancyConfig(resolution=16), torch.Generator().manual_seed(0))
    centres = _centres(grid)
    dist = (centres - ball.c).norm(dim=-1)
    h = 2.0 / 16
    half_diag = h * math.sqrt(3) / 2
    # density at the cell's farthest point still above the largest threshold (occ_thre / step) -> occupied
    far_sigma = 12.0 * F.relu(1 - (dist + half_diag) ** 2 / 0.45 ** 2) ** 2
    assert (far_sigma * grid.step_size > 0.01).sum() > 20
    assert grid.binary[far_sigma * grid.step_size > 0.01].all(), "cells dense everywhere are occupied"
    assert not grid.binary[dist - half_diag > 0.45].any(), "cells outside the blob are empty"
    corners = (centres.abs() > 1 - h).all(-1)
    assert corners.sum() == 8 and not grid.binary[corners].any()
    assert 0.02 < grid.fraction_occupied() < 0.1  # ball volume / box volume = 0.048


def test_refresh_is_an_ema_max_and_threshold_is_nerfacc():
    cfg = OccupancyConfig(resolution=4, ema_decay=0.5, samples_per_ray=100, warmup_steps=2, update_every=1)
    grid = OccupancyGrid(cfg, radius=1.0)
    step = math.sqrt(3) * 2 / 100
    assert grid.step_size == pytest.approx(step)

    class Const:
        value = 3.0

        def density(self, p):
            return torch.full_like(p[:, 0], self.value)

    f = Const()
    assert grid.update(f, 0) and torch.allclose(grid.density, torch.full((64,), 3.0))
    assert grid.binary.all()  # 3 * step = 0.10 > min(occ_thre, mean) = 0.01
    f.value = 0.0
    grid.update(f, 1)
    assert torch.allclose(grid.density, torch.full((64,), 1.5))  # max(0.5 * 3, 0)
    f.value = 2.0
    grid.update(f, 1)
    assert torch.allclose(grid.density, torch.full((64,), 2.0))  # max(0.75, 2)
    # after warmup: a quarter drawn uniformly + up to a quarter of the occupied cells; the rest keep their value
    f.value = 0.0
    grid.update(f, 2, torch.Generator().manual_seed(0))
    changed = grid.density != 2.0
    assert 0 < changed.sum() <= 32 and torch.allclose(grid.density[changed], torch.tensor(1.0))
    # threshold min(occ_thre, mean occupancy of all cells): one bright cell among dim ones
    grid.density = torch.full((64,), 0.01)
    grid.density[5] = 100.0
    grid.refresh(lambda p: torch.zeros_like(p[:, 0]), all_cells=True)
    assert grid.binary.nonzero().squeeze(-1).tolist() == [5]
    # empty cells count in the mean (nerfacc occs[occs >= 0].mean()): a dim cell above it is occupied even
    # though it is below both occ_thre and the mean of the non-empty cells
    grid.density = torch.zeros(64)
    grid.density[5], grid.density[6] = 20.0, 0.4  # after the 0.5 decay: occupancies 0.346 and 0.0069
    grid.refresh(lambda p: torch.zeros_like(p[:, 0]), all_cells=True)
    assert grid.binary.nonzero().squeeze(-1).tolist() == [5, 6]  # threshold 0.353 / 64 = 0.0055


def test_update_every_n_steps():
    grid = OccupancyGrid(OccupancyConfig(resolution=4, update_every=16), radius=1.0)
    f = CompactBall()
    done = [s for s in range(40) if grid.update(f, s)]
    assert done == [0, 16, 32]


# ---------------------------------------------------------------------------------------------- render
@pytest.mark.parametrize("shading", ["albedo", "lambertian"])
def test_render_with_covering_grid_equals_render_without(shading):
    ball = CompactBall()
    grid = _covering_grid(ball)
    cams = _cameras()
    outs, grads = [], []
    for occ in (None, grid):
        ball.zero_grad()
        out = render_volume(ball, (0.2, 0.4, 0.9), cams, RENDER, shading=shading, occupancy=occ)
        (out["rgb"] * torch.linspace(0, 1, 3)).sum().backward()
        outs.append(out)
        grads.append(_grads(ball))
    a, b = outs
    for k in ("rgb", "opacity", "depth"):
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert torch.equal(a["ray_index"], b["ray_index"]) and torch.allclose(a["weights"], b["weights"], atol=1e-5)
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-5, rtol=1e-5), k
    assert a["opacity"].max() > 0.5  # the ball is seen


def test_all_occupied_grid_equals_no_grid_for_a_nerf_field():
    torch.manual_seed(0)
    field = NeRFField(NeRFFieldConfig(grid=TINY_GRID))
    grid = OccupancyGrid(OccupancyConfig(resolution=8), radius=1.0).mark_all_occupied()
    cams = _cameras(2, 16)
    res = []
    for occ in (None, grid):
        field.zero_grad()
        out = render_volume(field, 1.0, cams, RENDER, shading="textureless", occupancy=occ)
        out["rgb"].sum().backward()
        res.append((out, _grads(field)))
    (a, ga), (b, gb) = res
    for k in ("rgb", "opacity", "depth", "normal"):
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    for k in ga:
        assert torch.allclose(ga[k], gb[k], atol=1e-5, rtol=1e-4), k


def test_unoccupied_samples_are_not_evaluated_and_get_zero_grad():
    field = VoxelField(R=8)
    grid = OccupancyGrid(OccupancyConfig(resolution=8), radius=1.0)
    grid.binary = _centres(grid)[:, 0] < 0  # the half box x < 0
    cams = make_cameras(0.0, torch.tensor([0.0, 90.0]), 2.5, 50.0, 16, 16)
    dense = render_volume(field, 0.5, cams, RENDER)
    n_dense = sum(p.shape[0] for p in field.points)
    field.points.clear()
    out = render_volume(field, 0.5, cams, RENDER, occupancy=grid)
    seen = torch.cat(field.points)
    assert seen.shape[0] > 0 and grid.occupied(seen).all(), "the field only sees occupied samples"
    assert seen.shape[0] < 0.7 * n_dense
    out["rgb"].sum().backward()
    empty_cells = ~grid.binary
    assert field.raw.grad[empty_cells].abs().max() == 0 and field.rgb.grad[empty_cells].abs().max() == 0
    assert field.raw.grad[grid.binary].abs().max() > 0
    assert out["rgb"].shape == dense["rgb"].shape and out["weights"].shape[1] == dense["weights"].shape[1]


def test_empty_grid_renders_background_only():
    ball = CompactBall()
    grid = OccupancyGrid(OccupancyConfig(resolution=8), radius=1.0)  # nothing occupied
    bg = torch.nn.Parameter(torch.tensor([0.3, 0.6, 0.9]))
    out = render_volume(ball, lambda d: bg.expand(*d.shape[:-1], 3), _cameras(1, 12), RENDER, occupancy=grid)
    assert ball.calls == 0 and out["weights"].shape[0] == 0
    assert torch.allclose(out["rgb"], bg.detach().expand(1, 12, 12, 3)) and out["opacity"].max() == 0
    out["rgb"].sum().backward()
    assert bg.grad is not None


def test_missed_rays_skipped_with_grid():
    ball = CompactBall()
    grid = OccupancyGrid(OccupancyConfig(resolution=4), radius=1.0).mark_all_occupied()
    cams = make_cameras(0.0, torch.tensor([0.0]), 6.0, 60.0, 24, 24)  # box covers the middle of the image
    out = render_volume(ball, 1.0, cams, RENDER, occupancy=grid)
    ref = render_volume(ball, 1.0, cams, RENDER)
    assert torch.equal(out["ray_index"], ref["ray_index"])
    assert torch.allclose(out["rgb"][0, 0, 0], torch.ones(3))  # a corner ray misses the box


# ---------------------------------------------------------------------------------------------- config / stage
@pytest.mark.parametrize("kw,word", [(dict(resolution=1), "resolution"), (dict(ema_decay=1.5), "ema_decay"),
                                     (dict(update_every=0), "update_every"), (dict(occ_thre=-1), "occ_thre"),
                                     (dict(samples_per_ray=0), "samples_per_ray")])
def test_bad_occupancy_config_is_one_line_error(kw, word):
    from dreamflow.stages import NeRFStageConfig

    with pytest.raises(DreamFlowError, match=word) as e:
        NeRFStageConfig(occupancy=OccupancyConfig(**kw)).validate()
    assert "\n" not in str(e.value)


def test_nerf_stage_builds_and_refreshes_the_grid(tiny_sd, monkeypatch):
    from dreamflow.stages import NeRFStageConfig, run_nerf_stage

    calls = []
    real = OccupancyGrid.refresh

    def spy(self, fn, all_cells=True, generator=None):
        calls.append(all_cells)
        return real(self, fn, all_cells, generator)

    monkeypatch.setattr(OccupancyGrid, "refresh", spy)
    cfg = NeRFStageConfig(iterations=3, views_per_update=1, resolution=16, denoise_resolution=16,
                          nerf=NeRFFieldConfig(grid=TINY_GRID), render=VolumeRenderConfig(n_samples=8, n_importance=4),
                          occupancy=OccupancyConfig(resolution=8, update_every=2, warmup_steps=2))
    state = run_nerf_stage(tiny_sd, "a cone", "", cfg)
    assert calls == [True, False]  # built over all cells, then refreshed before update 2 (past warmup)
    assert len(state.guidance_log) == 3
    calls.clear()
    cfg.occupancy.enabled = False
    run_nerf_stage(tiny_sd, "a cone", "", cfg)
    assert calls == []
