"""Occupancy grid: which cells of the scene box may hold density, so the volume renderer skips the rest.

Instant-NGP's density grid as nerfacc's ``OccGridEstimator`` keeps it and threestudio's
``nerf-volume-renderer`` uses it with ``grid_prune: true`` (one level, 32^3 cells over the scene box):

* every cell holds an exponential moving maximum of the density seen at a jittered point inside it:
  ``d_c <- max(decay * d_c, sigma(x_c))``, ``x_c`` uniform in the cell, evaluated without grad;
* during the first ``warmup_steps`` updates every cell is refreshed; after that a quarter of the cells
  drawn uniformly plus as many drawn among the occupied ones (cells not drawn keep their value);
* a cell is occupied when its occupancy ``d_c * step`` (threestudio: ``density * render_step_size``, the
  first-order ``1 - exp(-sigma step)``) exceeds ``min(occ_thre, mean occupancy over all cells)`` (nerfacc:
  ``occs[occs >= 0].mean()``; every cell here is >= 0, empty ones included).

The renderer (``render_volume(..., occupancy=grid)``) treats samples in unoccupied cells as density 0 and
never evaluates the field there. The grid lives on the field's device and is rebuilt from the field at the
start of a stage (it is not part of the saved state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..errors import check


@dataclass
class OccupancyConfig:
    """Occupancy-grid pruning (defaults: nerfacc ``OccGridEstimator.update_every_n_steps`` as threestudio
    ``nerf-volume-renderer`` calls it, ``grid_prune: true``)."""

    enabled: bool = True
    """Skip samples in empty cells (threestudio ``grid_prune: true``); False evaluates every sample."""
    resolution: int = 32
    """Cells per side of the box (threestudio ``OccGridEstimator(resolution=32, levels=1)``)."""
    update_every: int = 16
    """Refresh the grid every this many updates (nerfacc ``update_every_n_steps`` n=16)."""
    warmup_steps: int = 256
    """Updates before which every cell is refreshed; later 1/4 uniform + 1/4 occupied cells (nerfacc 256)."""
    ema_decay: float = 0.95
    """Decay of the per-cell moving maximum per refresh (nerfacc ``ema_decay`` 0.95)."""
    occ_thre: float = 0.01
    """Occupancy threshold on ``density * step`` (nerfacc ``occ_thre`` 1e-2; lowered to the mean occupancy of
    all cells when that is smaller)."""
    samples_per_ray: int = 512
    """Sets ``step = sqrt(3) * 2 radius / samples_per_ray``, world units (threestudio ``num_samples_per_ray``
    512, ``render_step_size``): with radius 1, cells below sigma ~1.5 per unit count as empty."""
    chunk: int = 1 << 18
    """Points per no-grad density call while refreshing (memory bound of one call)."""

    def validate(self) -> "OccupancyConfig":
        check(self.resolution >= 2, f"occupancy resolution={self.resolution} must be >= 2 cells (32 is usual)")
        check(self.update_every >= 1, f"occupancy update_every={self.update_every} must be >= 1 update (16 is usual)")
        check(self.warmup_steps >= 0, f"occupancy warmup_steps={self.warmup_steps} must be >= 0 (256 is usual)")
        check(0.0 <= self.ema_decay <= 1.0, f"occupancy ema_decay={self.ema_decay} must be in [0, 1] (0.95 is usual)")
        check(self.occ_thre >= 0, f"occupancy occ_thre={self.occ_thre} must be >= 0 (0.01 is usual)")
        check(self.samples_per_ray >= 1, f"occupancy samples_per_ray={self.samples_per_ray} must be >= 1 (512 is usual)")
        check(self.chunk >= 1024, f"occupancy chunk={self.chunk} must be >= 1024 points")
        return self


class OccupancyGrid:
    """A [R, R, R] grid of moving-maximum densities over the box [-radius, radius]^3 and its occupied mask.

    Cell (i, j, k) covers x in [-r + i h, -r + (i + 1) h) (and likewise y, z), h = 2 r / R; index order x, y, z.

    Attributes:
        density: [R^3] float32 >= 0, the moving maximum of sigma per cell (per world unit).
        binary: [R^3] bool, occupied cells.
    """

    def __init__(self, config: Optional[OccupancyConfig] = None, radius: float = 1.0,
                 device: Optional[torch.device] = None):
        self.config = cfg = (config or OccupancyConfig()).validate()
        check(radius > 0, f"occupancy grid radius={radius} must be > 0 (the field's box half side)")
        self.radius = float(radius)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.step_size = math.sqrt(3.0) * 2.0 * self.radius / cfg.samples_per_ray
        n = cfg.resolution ** 3
        self.density = torch.zeros(n, dtype=torch.float32, device=self.device)
        self.binary = torch.zeros(n, dtype=torch.bool, device=self.device)
        R = cfg.resolution
        ar = torch.arange(R, device=self.device)
        self._coords = torch.stack(torch.meshgrid(ar, ar, ar, indexing="ij"), -1).reshape(-1, 3)  # [R^3, 3] long

    @classmethod
    def from_field(cls, field, config: Optional[OccupancyConfig] = None,
                   generator: Optional[torch.Generator] = None) -> "OccupancyGrid":
        """A grid over ``field``'s box (``field.config.radius``, else 1) on its device, refreshed once over every
        cell (threestudio's update before the first render)."""
        radius = float(getattr(getattr(field, "config", None), "radius", 1.0))
        try:
            device = next(field.parameters()).device
        except (AttributeError, StopIteration):
            device = torch.device("cpu")
        grid = cls(config, radius, device)
        grid.refresh(field.density, all_cells=True, generator=generator)
        return grid

    # ------------------------------------------------------------------------------------------
    def mark_all_occupied(self) -> "OccupancyGrid":
        """Every cell occupied (threestudio ``grid_prune: false``): renders then equal ``occupancy=None`` for the same
        samples, i.e. exactly with ``stratified=False`` (the grid path draws its jitter for every ray, the
        ungridded one for the rays that hit the box, so stratified draws differ)."""
        self.binary.fill_(True)
        return self

    def occupied(self, points: torch.Tensor) -> torch.Tensor:
        """Occupied-cell lookup. Args: points [..., 3] world. Returns: [...] bool (False outside the box)."""
        R = self.config.resolution
        u = (points.detach() + self.radius) * (R / (2.0 * self.radius))
        inside = ((u >= 0) & (u < R)).all(-1)
        ijk = u.floor().long().clamp_(0, R - 1)
        flat = (ijk[..., 0] * R + ijk[..., 1]) * R + ijk[..., 2]
        return self.binary[flat] & inside

    def update(self, field, step: int, generator: Optional[torch.Generator] = None) -> bool:
        """Refresh the grid from ``field.density`` when ``step % update_every == 0`` (nerfacc
        ``update_every_n_steps``): all cells before ``warmup_steps``, else a random quarter plus occupied ones.

        Args:
            field: has ``density(points [N, 3]) -> [N]`` (world units), on this grid's device.
            step: the update about to be rendered (the stage calls it with ``step + 1`` after each update).
            generator: jitter and cell draws (on this grid's device; None: torch's default).
        Returns: whether the grid was refreshed.
        """
        cfg = self.config
        if step % cfg.update_every != 0:
            return False
        self.refresh(field.density, all_cells=step < cfg.warmup_steps, generator=generator)
        return True

    @torch.no_grad()
    def refresh(self, density_fn: Callable[[torch.Tensor], torch.Tensor], all_cells: bool = True,
                generator: Optional[torch.Generator] = None) -> None:
        """One moving-maximum refresh: ``d_c <- max(decay d_c, sigma(x_c))`` over every cell or a sample of cells."""
        cfg = self.config
        n = self.density.numel()
        if all_cells:
            cells = torch.arange(n, device=self.device)
        else:
            # nerfacc: n/4 uniform cells plus up to n/4 of the occupied ones (the nonzero is one sync per refresh)
            quarter = n // 4
            uniform = torch.randint(n, (quarter,), generator=generator, device=self.device)
            occ = torch.nonzero(self.binary).squeeze(-1)
            if occ.numel() > quarter:
                occ = occ[torch.randint(occ.numel(), (quarter,), generator=generator, device=self.device)]
            cells = torch.cat([uniform, occ])
        jitter = torch.rand(cells.numel(), 3, generator=generator, device=self.device)
        x = (self._coords[cells].float() + jitter) * (2.0 * self.radius / cfg.resolution) - self.radius
        sigma = torch.cat([density_fn(x[i:i + cfg.chunk]).float().reshape(-1)
                           for i in range(0, x.shape[0], cfg.chunk)])
        # Decay the drawn cells once, then take the max with every draw (scatter amax: deterministic with repeats).
        new = self.density.clone()
        new[cells] = self.density[cells] * cfg.ema_decay
        new.scatter_reduce_(0, cells, sigma, reduce="amax")
        self.density = new
        occ = self.density * self.step_size
        # nerfacc's mean is over all cells (its occs >= 0), zeros included: no host sync, it stays on the device
        self.binary = occ > occ.mean().clamp_max(cfg.occ_thre)

    def fraction_occupied(self) -> float:
        """Share of occupied cells in [0, 1] (a host sync: for logs and tests)."""
        return float(self.binary.float().mean())
