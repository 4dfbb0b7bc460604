"""Hash grid: torch path vs a brute-force per-point/per-corner twin written from tiny-cuda-nn's formulas."""

import math

import numpy as np
import pytest
import torch

from dreamflow.errors import DreamFlowError
from dreamflow.scene.hashgrid import (HASH_PRIMES, HashGrid, HashGridConfig, hash_grid_table_grad, hash_grid_torch,
                                      level_layout)

# 5 levels, T = 2^10: resolutions 4, 7, 12, 20, 34 -> levels 0-1 dense, 2-4 hashed; non-integer scales
# (5.8, 10.56, ...) exercise tcnn's ceil(scale) + 1 resolution and its "one past the grid" corner.
SMALL = HashGridConfig(n_levels=5, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4,
                       per_level_scale=1.7, backend="torch")


def brute_force_corners(x: torch.Tensor, cfg: HashGridConfig):
    """tcnn kernel_grid, one point / level / corner at a time in Python scalars.

    Yields (point n, level, table row = level offset + index, trilinear weight).
    """
    T = 1 << cfg.log2_hashmap_size
    offset = 0
    for level in range(cfg.n_levels):
        scale = float(np.float32(np.exp2(np.float32(level) * np.log2(np.float32(cfg.per_level_scale)))
                                 * np.float32(cfg.base_resolution) - np.float32(1)))
        res = math.ceil(scale) + 1
        size = min(((res ** 3 + 7) // 8) * 8, T)
        for n in range(x.shape[0]):
            p = [float(np.float32(float(x[n, d]) * scale + 0.5)) for d in range(3)]
            g = [math.floor(v) for v in p]
            fr = [p[d] - g[d] for d in range(3)]
            for corner in range(8):
                w, loc = 1.0, []
                for d in range(3):
                    bit = (corner >> d) & 1
                    w *= fr[d] if bit else 1 - fr[d]
                    loc.append(g[d] + bit)
                if res ** 3 <= size:
                    index = loc[0] + loc[1] * res + loc[2] * res * res
                else:
                    index = 0
                    for d in range(3):
                        index ^= (loc[d] * HASH_PRIMES[d]) & 0xFFFFFFFF
                yield n, level, offset + index % size, w
        offset += size


def brute_force(x: torch.Tensor, table: torch.Tensor, cfg: HashGridConfig) -> torch.Tensor:
    F = cfg.n_features_per_level
    out = torch.zeros(x.shape[0], cfg.n_levels * F, dtype=torch.float64)
    for n, level, row, w in brute_force_corners(x, cfg):
        out[n, level * F:(level + 1) * F] += w * table[row].double()
    return out


def _points(n, seed):
    x = torch.rand(n, 3, generator=torch.Generator().manual_seed(seed))
    x[0] = 0.0  # box corners: the grid's first and (one past) last cells
    x[1] = 1.0
    return x


def test_layout_matches_tcnn_formulas():
    lay = level_layout(SMALL)
    assert lay["resolution"].tolist() == [4, 7, 12, 20, 34]
    assert lay["size"].tolist() == [64, 344, 1024, 1024, 1024]  # 7^3 = 343 aligned to 8
    assert lay["hashed"].tolist() == [False, False, True, True, True]
    # threestudio prolificdreamer grid: 16 .. 4096, 12,599,920 parameters (= 2 x sum of per-level entries)
    lay = level_layout(HashGridConfig())
    assert lay["resolution"][0] == 16 and lay["resolution"][-1] == 4096
    assert lay["total"] * 2 == 12_599_920


def test_forward_matches_brute_force():
    grid = HashGrid(SMALL, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # larger values than the 1e-4 init make the comparison meaningful
        grid.params.copy_(torch.randn(grid.params.shape, generator=torch.Generator().manual_seed(1)))
    x = _points(48, 2)
    y = grid(x)
    assert y.shape == (48, 10) and y.dtype == torch.float32
    ref = brute_force(x, grid.table.detach(), SMALL)
    # float32 positions/weights vs float64 reference: |table| ~ 3, eight corners -> ~1e-6 abs
    torch.testing.assert_close(y.double(), ref, atol=5e-6, rtol=1e-5)


def test_init_range_and_clamp():
    grid = HashGrid(SMALL)
    assert grid.params.abs().max() <= 1e-4 and grid.params.abs().max() > 5e-5
    x = torch.tensor([[-0.5, 0.3, 1.7]])
    torch.testing.assert_close(grid(x), grid(x.clamp(0, 1)))


def test_table_gradient_matches_brute_force_and_is_local():
    grid = HashGrid(SMALL, generator=torch.Generator().manual_seed(0))
    x = _points(16, 3)
    g = torch.randn(16, 10, generator=torch.Generator().manual_seed(4))
    (grid(x) * g).sum().backward()
    # brute force: d/d table[row] of sum_n g_n . y_n = sum over (n, level, corner) hitting row of w * g_n[level]
    F = SMALL.n_features_per_level
    ref = torch.zeros(grid.total_entries, F, dtype=torch.float64)
    touched = torch.zeros(grid.total_entries, dtype=torch.bool)
    for n, level, row, w in brute_force_corners(x, SMALL):
        ref[row] += w * g[n, level * F:(level + 1) * F].double()
        touched[row] |= w > 0
    grad = grid.params.grad.view(grid.total_entries, F)
    torch.testing.assert_close(grad.double(), ref, atol=1e-6, rtol=1e-5)
    assert (grad[~touched] == 0).all()  # only the corners the points touched get gradient
    assert (grad[touched].abs().sum(-1) > 0).float().mean() > 0.95
    assert 0 < touched.sum() < grid.total_entries


def test_recomputed_backward_equals_autograd_and_keeps_only_the_points():
    """Ray samples (no grad on x): the backward recomputes the corners; same table gradient as autograd through
    hash_grid_torch, but only x (12 bytes / point) and the scales are kept between forward and backward."""
    grid = HashGrid(HashGridConfig(backend="torch"), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        grid.params.normal_(generator=torch.Generator().manual_seed(1))
    x = _points(500, 7)
    g = torch.randn(500, grid.n_output_dims, generator=torch.Generator().manual_seed(8))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
        out = grid(x)
    (out * g).sum().backward()
    recomputed = grid.params.grad.clone()
    grid.params.grad = None
    ref = hash_grid_torch(x, grid.table, grid.scale, grid.levels)
    (ref * g).sum().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(recomputed, grid.params.grad, rtol=1e-6, atol=1e-6)
    assert recomputed.abs().sum() > 0
    assert sum(saved) <= x.numel() * 4 + grid.scale.numel() * 4  # autograd would keep ~1.5 KB per point here
    # positions that need gradients (analytic normals, mesh surface points) take autograd's path
    xg = x.clone().requires_grad_(True)
    (grid(xg) * g).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_input_gradient_matches_finite_differences():
    """d features / d x (what analytic normals use) against central differences, in float64."""
    grid = HashGrid(SMALL, generator=torch.Generator().manual_seed(0))
    table = torch.randn(grid.table.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = (0.1 + 0.8 * torch.rand(6, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)).requires_grad_(True)
    fn = lambda p: hash_grid_torch(p, table, grid.scale.double(), grid.levels)  # noqa: E731
    # piecewise trilinear: exact away from cell faces; eps far below the finest cell (1/34)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-7, atol=1e-5)


def test_traces_without_graph_breaks():
    """No data-dependent Python control flow: dynamo captures the whole encoder in one graph."""
    grid = HashGrid(SMALL)
    x = torch.rand(64, 3)
    compiled = torch.compile(hash_grid_torch, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, grid.table, grid.scale, grid.levels), grid(x))
    g = torch.randn(64, grid.n_output_dims)
    grad = torch.compile(hash_grid_table_grad, backend="eager", fullgraph=True)
    torch.testing.assert_close(grad(x, g, grid.scale, grid.levels, *grid.table.shape),
                               hash_grid_table_grad(x, g, grid.scale, grid.levels, *grid.table.shape))


def test_bad_config_is_one_line_error():
    with pytest.raises(DreamFlowError, match="n_features_per_level=3"):
        HashGrid(HashGridConfig(n_features_per_level=3))
    with pytest.raises(DreamFlowError, match="backend 'gpu'"):
        HashGrid(HashGridConfig(backend="gpu"))


@pytest.mark.gpu
def test_tcnn_matches_torch():
    """Same parameters, same points: tiny-cuda-nn and the torch path agree (outputs and table grads)."""
    from dreamflow.backends import tinycudann

    if tinycudann() is None:
        pytest.skip("tiny-cuda-nn with CUDA not available")
    cfg = HashGridConfig(**{**SMALL.__dict__, "backend": "cuda"})
    fast = HashGrid(cfg).cuda()
    slow = HashGrid(HashGridConfig(**{**SMALL.__dict__, "backend": "torch"})).cuda()
    with torch.no_grad():
        fast.params.copy_(torch.randn(fast.params.shape))
        slow.params.copy_(fast.params)
    x = torch.rand(4096, 3, device="cuda")
    g = torch.randn(4096, 10, device="cuda")
    (fast(x) * g).sum().backward()
    (slow(x) * g).sum().backward()
    torch.testing.assert_close(fast(x), slow(x), atol=1e-5, rtol=1e-4)  # float32 atomics reorder sums
    torch.testing.assert_close(fast.params.grad, slow.params.grad, atol=1e-4, rtol=1e-3)
