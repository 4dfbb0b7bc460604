"""Volume rendering of a density/albedo field inside the box [-radius, radius]^3 (plain torch, any device).

Per ray (NeRF, Mildenhall et al. 2020, eq. 3):
``C = sum_i T_i alpha_i c_i + (1 - sum_i T_i alpha_i) c_bg``, ``alpha_i = 1 - exp(-sigma_i delta_i)``,
``T_i = exp(-sum_{j<i} sigma_j delta_j)``.

Sampling (hierarchical, NeRF sec. 5.2, one field for both passes):

1. rays that miss the box are never sampled (background only);
2. coarse pass without grad: ``n_samples`` stratified samples between the box entry and exit;
3. rays whose coarse opacity is below ``empty_ray_opacity`` stop there (empty space: background only);
4. ``n_importance`` fine samples drawn from the coarse weights' piecewise-constant PDF (inverse CDF);
5. the field is evaluated *with grad* at the sorted union of coarse and fine samples, each sample
   standing for the interval between its neighbours' midpoints (first/last reach the box entry/exit).

With an occupancy grid (render/occupancy.py, threestudio's ``grid_prune``) samples in unoccupied cells
count as density 0 and the field is never called there: both passes evaluate only occupied samples and
scatter them into the dense [rays, samples] layout the compositing uses (autograd flows through the
scatter). Host syncs (``nonzero``), one per compaction: rays in the box and occupied coarse samples (one),
kept rays, occupied fine samples.

All views of a batch are flattened into one ray batch. Shading (render/shading.py) happens per sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Protocol, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..errors import check
from .cameras import Cameras
from .occupancy import OccupancyGrid
from .shading import SHADING_MODES, ShadingConfig, light_directions, shade


class Field(Protocol):
    """What the renderer needs from a scene (``dreamflow.scene.nerf.NeRFField`` is one)."""

    def density(self, points: torch.Tensor) -> torch.Tensor:  # [N, 3] world -> [N] >= 0
        ...

    def __call__(self, points: torch.Tensor, need_normal: bool = False) -> Dict[str, torch.Tensor]:
        ...  # dict(density [N], albedo [N, 3], normal [N, 3] when need_normal)


@dataclass
class VolumeRenderConfig:
    """Volume renderer settings (sample counts: NeRF's hierarchical sampling, sized for a 64..128 px SDS render)."""

    n_samples: int = 64
    """Coarse stratified samples per ray (NeRF 64)."""
    n_importance: int = 64
    """Fine samples per ray from the coarse weights' PDF (NeRF uses 128 with a separate fine MLP)."""
    radius: Optional[float] = None
    """Half side of the box rays are clipped to, world units; None: the field's ``config.radius`` (else 1.0)."""
    near_min: float = 0.0
    """Smallest ray distance sampled (cameras inside the box start at their centre), world units."""
    stratified: bool = True
    """Jitter coarse samples and fine CDF draws (training); False gives a deterministic render (previews, tests)."""
    pdf_padding: float = 0.01
    """Fraction of the coarse weight mass spread uniformly over the ray before fine sampling (mip-NeRF's
    resample padding), so thin structures missed by the coarse pass can still be sampled."""
    empty_ray_opacity: float = 1e-4
    """Rays whose coarse opacity is below this skip the fine pass (background only); 0 renders every hit ray."""
    chunk: int = 1 << 18
    """Points per field call (memory bound of one call, not of the autograd graph)."""

    def validate(self) -> "VolumeRenderConfig":
        check(self.n_samples >= 2, f"volume n_samples={self.n_samples} must be >= 2 (64 is usual)")
        check(self.n_importance >= 0, f"volume n_importance={self.n_importance} must be >= 0 (64 is usual)")
        check(self.chunk >= 1024, f"volume chunk={self.chunk} must be >= 1024 points")
        check(self.radius is None or self.radius > 0, f"volume radius={self.radius} must be > 0 or None")
        check(self.empty_ray_opacity >= 0, f"empty_ray_opacity={self.empty_ray_opacity} must be >= 0")
        return self


BackgroundLike = Union[None, float, Sequence[float], Callable[..., torch.Tensor], torch.nn.Module]


# ----------------------------------------------------------------------------------------------
# Pieces (each usable on its own; the tests check them against per-ray loops)
# ----------------------------------------------------------------------------------------------
def ray_box(origins: torch.Tensor, dirs: torch.Tensor, radius: float, near_min: float = 0.0
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slab intersection of rays [R, 3] with the box [-radius, radius]^3.

    Returns:
        near [R], far [R] (world distances along unit ``dirs``; near >= near_min) and hit [R] bool (far > near).
    """
    safe = torch.where(dirs.abs() < 1e-12, torch.full_like(dirs, 1e-12), dirs)
    inv = 1.0 / safe
    t1 = (-radius - origins) * inv
    t2 = (radius - origins) * inv
    near = torch.minimum(t1, t2).amax(dim=-1).clamp_min(near_min)
    far = torch.maximum(t1, t2).amin(dim=-1)
    return near, far, far > near


def _rand(shape, generator: Optional[torch.Generator], device) -> torch.Tensor:
    """U[0, 1) on ``device``; drawn from ``generator`` on its own device (CPU generators: then moved, which
    syncs a CUDA stream: give a generator on the render's device)."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _evaluate_occupied(fn: Callable[[torch.Tensor], object], points: torch.Tensor, mask: torch.Tensor, chunk: int):
    """``fn`` on the masked points only, scattered back into zeros shaped like the dense result.

    Args: points [N, 3]; mask [N] bool (True: evaluate). Returns: like ``_chunked(fn, points)`` with zeros
    (and zero gradients) where ``mask`` is False.
    """
    sel = torch.nonzero(mask.reshape(-1), as_tuple=False).squeeze(-1)
    N = points.shape[0]

    def scatter(v: torch.Tensor) -> torch.Tensor:
        return v.new_zeros((N,) + tuple(v.shape[1:])).index_copy(0, sel, v)

    part = _chunked(fn, points[sel], chunk)  # no point selected: one call on 0 points keeps shapes and the graph
    if isinstance(part, dict):
        return {k: scatter(v) for k, v in part.items()}
    return scatter(part)


def sample_pdf(edges: torch.Tensor, weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF samples of a piecewise-constant PDF (NeRF ``sample_pdf``).

    Args:
        edges: [R, B + 1] sorted bin edges; weights: [R, B] >= 0 (not all zero); u: [R, n] in [0, 1).
    Returns:
        [R, n] ray distances, inside [edges[:, 0], edges[:, -1]].
    """
    pdf = weights / weights.sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf, -1)], -1).clamp_max(1.0)  # [R, B+1]
    B = weights.shape[1]
    idx = torch.searchsorted(cdf.contiguous(), u.contiguous(), right=True)
    below = (idx - 1).clamp(0, B)
    above = idx.clamp(0, B)
    cdf0, cdf1 = cdf.gather(1, below), cdf.gather(1, above)
    e0, e1 = edges.gather(1, below), edges.gather(1, above)
    denom = cdf1 - cdf0
    frac = torch.where(denom < 1e-8, torch.zeros_like(denom), (u - cdf0) / denom.clamp_min(1e-8))
    return e0 + frac * (e1 - e0)


def composite_weights(sigma: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """w_i = T_i alpha_i with alpha_i = 1 - exp(-sigma_i delta_i), T_i = exp(-sum_{j<i} sigma_j delta_j).

    Args: sigma, delta: [R, M] (>= 0). Returns: [R, M] weights, sum <= 1 along M.
    """
    tau = sigma * delta
    excl = torch.cumsum(tau, dim=-1) - tau  # exclusive prefix sum: optical depth before sample i
    return torch.exp(-excl) * (1.0 - torch.exp(-tau))


def interval_edges(t: torch.Tensor, near: torch.Tensor, far: torch.Tensor) -> torch.Tensor:
    """Edges [R, M + 1] of the intervals sorted samples t [R, M] stand for: near, neighbour midpoints, far."""
    mid = 0.5 * (t[:, 1:] + t[:, :-1])
    return torch.cat([near[:, None], mid, far[:, None]], dim=-1)


def _chunked(fn: Callable[[torch.Tensor], object], points: torch.Tensor, chunk: int):
    """Apply ``fn`` to ``points`` [N, 3] in chunks and concatenate tensors (or dicts of tensors)."""
    if points.shape[0] <= chunk:
        return fn(points)
    parts = [fn(points[i:i + chunk]) for i in range(0, points.shape[0], chunk)]
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts], 0) for k in parts[0]}
    return torch.cat(parts, 0)


def evaluate_background(background: BackgroundLike, dirs: torch.Tensor,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Background colour for ray directions [V, H, W, 3] -> [V, H, W, 3] in [0, 1].

    ``background``: None (black), a grey level / (r, g, b), a ``Background`` module (gets ``generator``
    for its random solid colours) or any callable ``dirs -> rgb``.
    """
    from ..scene.nerf import Background, solid_color

    if background is None:
        return torch.zeros_like(dirs)
    if isinstance(background, (int, float, tuple, list)):
        return solid_color(dirs, background)
    if isinstance(background, Background):
        return background(dirs, generator=generator)
    return background(dirs)


# ----------------------------------------------------------------------------------------------
# Renderer
# ----------------------------------------------------------------------------------------------
def render_volume(field: Field, background: BackgroundLike, cameras: Cameras,
                  config: Optional[VolumeRenderConfig] = None, shading: str = "albedo",
                  light_positions: Optional[torch.Tensor] = None, shading_config: Optional[ShadingConfig] = None,
                  need_normal: Optional[bool] = None, generator: Optional[torch.Generator] = None,
                  occupancy: Optional[OccupancyGrid] = None) -> Dict[str, Optional[torch.Tensor]]:
    """Render V views of ``field`` composited over ``background``.

    Args:
        field: see :class:`Field` (world points in, density per world unit out).
        background: see :func:`evaluate_background`.
        cameras: V cameras, H x W pixels (render/cameras.py), on the field's device.
        config: sampling settings (defaults :class:`VolumeRenderConfig`).
        shading: "albedo" | "lambertian" | "textureless" (render/shading.py).
        light_positions: [V, 3] point lights for lambertian / textureless (None: a light at each camera).
        shading_config: k_a / k_d (defaults :class:`ShadingConfig`).
        need_normal: compute normals (default: only when ``shading`` needs them).
        generator: randomness of the stratified samples and of the background's random colours (best on the
            cameras' device: a CPU generator's draws are copied every call).
        occupancy: an :class:`~dreamflow.render.occupancy.OccupancyGrid` over the field's box: samples in its
            unoccupied cells count as density 0 and are not evaluated (None: every sample is evaluated).
    Returns:
        dict with images ``rgb`` [V, H, W, 3] (in [0, 1]), ``opacity`` [V, H, W, 1] (sum of weights),
        ``depth`` [V, H, W, 1] (sum w_i t_i, threestudio's convention: divide by opacity for the mean
        surface distance), ``normal`` [V, H, W, 3] (sum w_i n_i, world, or None), ``background``
        [V, H, W, 3]; and per sample of the Ra rendered rays: ``weights`` [Ra, M], ``t`` [Ra, M],
        ``sample_normal`` [Ra, M, 3] (or None), ``ray_dirs`` [Ra, 3], ``ray_index`` [Ra] (flat index
        into V*H*W), with M = n_samples + n_importance.
    """
    cfg = (config or VolumeRenderConfig()).validate()
    check(shading in SHADING_MODES, f"shading '{shading}' is unknown; use one of: {', '.join(SHADING_MODES)}")
    sh = shading_config or ShadingConfig()
    need_normal = (shading != "albedo") if need_normal is None else bool(need_normal)
    radius = cfg.radius if cfg.radius is not None else float(getattr(getattr(field, "config", None), "radius", 1.0))
    V, H, W = len(cameras), cameras.height, cameras.width
    device = cameras.device

    # 1. rays and box clipping
    origins, dirs = cameras.rays()
    bg = evaluate_background(background, dirs, generator)  # [V, H, W, 3]
    o, d = origins.reshape(-1, 3), dirs.reshape(-1, 3)
    R = o.shape[0]
    near, far, hit = ray_box(o, d, radius, cfg.near_min)
    if occupancy is None:
        idx = torch.nonzero(hit, as_tuple=False).squeeze(-1)
        o, d, near, far = o[idx], d[idx], near[idx], far[idx]
    else:  # rays that miss the box are dropped with the empty cells below (one compaction, one host sync)
        idx = torch.arange(R, device=device)

    # 2. coarse pass (no grad): stratified samples in equal bins between near and far
    Ns = cfg.n_samples
    u = torch.linspace(0.0, 1.0, Ns + 1, device=device)
    edges_c = near[:, None] + (far - near)[:, None] * u  # [Rh, Ns+1]
    jitter = _rand((idx.numel(), Ns), generator, device) if cfg.stratified else torch.full((idx.numel(), Ns), 0.5, device=device)
    t_c = edges_c[:, :-1] + (edges_c[:, 1:] - edges_c[:, :-1]) * jitter
    with torch.no_grad():
        pts = (o[:, None, :] + d[:, None, :] * t_c[..., None]).reshape(-1, 3)
        if occupancy is None:
            sigma_c = _chunked(field.density, pts, cfg.chunk)
        else:
            live = (occupancy.occupied(pts).view(-1, Ns) & hit[:, None]).reshape(-1)
            sigma_c = _evaluate_occupied(field.density, pts, live, cfg.chunk)
        sigma_c = sigma_c.view(-1, Ns).float()
        w_c = composite_weights(sigma_c, edges_c[:, 1:] - edges_c[:, :-1])
        # 3. empty rays stop here
        keep = w_c.sum(-1) > cfg.empty_ray_opacity
        if cfg.empty_ray_opacity <= 0:
            keep = torch.ones_like(keep)
        if occupancy is not None:
            keep = keep & hit
        kidx = torch.nonzero(keep, as_tuple=False).squeeze(-1)
        idx, o, d, near, far, t_c, edges_c, w_c = (x[kidx] for x in (idx, o, d, near, far, t_c, edges_c, w_c))
        # 4. fine samples from the coarse weights
        Ra, Ni = idx.numel(), cfg.n_importance
        if Ni > 0 and Ra > 0:
            mass = w_c.sum(-1, keepdim=True)
            pdf_w = w_c + cfg.pdf_padding * mass / Ns + 1e-8
            base = (torch.arange(Ni, device=device, dtype=torch.float32))[None, :]
            uu = (base + (_rand((Ra, Ni), generator, device) if cfg.stratified else 0.5)) / Ni
            uu = uu.expand(Ra, Ni)
            t_f = sample_pdf(edges_c, pdf_w, uu)
            t, _ = torch.sort(torch.cat([t_c, t_f], -1), -1)
        else:
            t = t_c
    M = t.shape[1]

    # 5. fine pass with grad on the sorted union (with a grid: occupied samples only, scattered into [Ra, M])
    pts = (o[:, None, :] + d[:, None, :] * t[..., None]).reshape(-1, 3)
    eval_fn = lambda p: field(p, need_normal=need_normal)  # noqa: E731
    if occupancy is None:
        out = _chunked(eval_fn, pts, cfg.chunk)
    else:
        out = _evaluate_occupied(eval_fn, pts, occupancy.occupied(pts), cfg.chunk)
    sigma = out["density"].view(Ra, M)
    albedo = out["albedo"].view(Ra, M, 3)
    normal = out["normal"].view(Ra, M, 3) if need_normal else None
    delta = (interval_edges(t, near, far)).diff(dim=-1)
    w = composite_weights(sigma, delta)  # [Ra, M]

    if shading == "albedo":
        colour = albedo
    else:
        lights = cameras.position if light_positions is None else light_positions.to(device)
        view_of_ray = torch.div(idx, H * W, rounding_mode="floor")
        light_dir = light_directions(lights[view_of_ray][:, None, :], pts.view(Ra, M, 3))
        colour = shade(albedo, normal, light_dir, sh.ambient, sh.diffuse, shading)

    opacity_r = w.sum(-1, keepdim=True)
    rgb_r = (w[..., None] * colour).sum(1)
    depth_r = (w * t).sum(-1, keepdim=True)

    def image(values: torch.Tensor, channels: int) -> torch.Tensor:
        full = torch.zeros(R, channels, device=device, dtype=values.dtype)
        return full.index_copy(0, idx, values).view(V, H, W, channels)

    opacity = image(opacity_r, 1)
    rgb = image(rgb_r, 3) + (1.0 - opacity) * bg
    return {
        "rgb": rgb,
        "opacity": opacity,
        "depth": image(depth_r, 1),
        "normal": image((w[..., None] * normal).sum(1), 3) if need_normal else None,
        "background": bg,
        "weights": w,
        "t": t,
        "sample_normal": normal,
        "ray_dirs": d,
        "ray_index": idx,
    }


# ----------------------------------------------------------------------------------------------
# Regularisers
# ----------------------------------------------------------------------------------------------
def orientation_loss(weights: torch.Tensor, normal: torch.Tensor, ray_dirs: torch.Tensor) -> torch.Tensor:
    """DreamFusion's orientation regulariser (appendix, eq. 9; threestudio ``loss_orient``).

    ``sum_i stopgrad(w_i) * max(0, n_i . d)^2`` per ray (normals facing away from the camera), summed
    over rays and divided by the number of rays with positive opacity.

    Args:
        weights: [R, M] (``render_volume`` ``weights``); normal: [R, M, 3] (``sample_normal``);
        ray_dirs: [R, 3] unit directions (camera -> scene).
    Returns: scalar tensor >= 0.
    """
    facing_away = (normal * ray_dirs[:, None, :]).sum(-1).clamp_min(0.0)
    n_rays = (weights.detach().sum(-1) > 0).sum().clamp_min(1)
    return (weights.detach() * facing_away ** 2).sum() / n_rays


def sparsity_loss(opacity: torch.Tensor) -> torch.Tensor:
    """threestudio ``loss_sparsity``: mean sqrt(opacity^2 + 0.01) (a smooth L1 pushing opacity to 0)."""
    return torch.sqrt(opacity ** 2 + 0.01).mean()


def opaque_loss(opacity: torch.Tensor) -> torch.Tensor:
    """threestudio ``loss_opaque``: binary entropy of the clamped opacity (pushes pixels to 0 or 1)."""
    o = opacity.clamp(1e-3, 1.0 - 1e-3)
    return F.binary_cross_entropy(o, o)
