"""What every optimisation stage's config shares (:class:`StageConfig`): the schedule's size, the views, the seed,
the guidance (method and its knobs) and the learning rates of the parts every stage optimises.

The stages' configs (``NeRFStageConfig``, ``MeshStageConfig``, ``RefineConfig``) derive from it and redeclare a
field only where their default differs (e.g. the mesh stage's resolution and APFO range).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Tuple

from ..guidance import GuidanceConfig
from ..render.cameras import CameraConfig


@dataclass
class StageConfig:
    """The common part of the stage configs (defaults: stage 1's; the later stages redeclare theirs)."""

    iterations: int = 2500
    """Updates. 2,500 x 4 views = 10,000 view-updates, the reference workload of bench/ (ours)."""
    views_per_update: int = 4
    """Random views rendered per update (batched through the denoiser; ours, for GPU efficiency)."""
    resolution: int = 256
    """Render size, px (paper stage 1)."""
    denoise_resolution: int = 512
    """Renders are resized to this before VAE encoding: SD 2.1 base works at 512 (threestudio resizes to 512)."""
    seed: int = 0
    """Seeds the initialisation, cameras, noise, lights and the LoRA: same seed + settings + device -> same result."""
    guidance: GuidanceConfig = field(default_factory=lambda: GuidanceConfig(method="apfo", t_start=1.0, t_end=0.2))
    """The guidance method and its knobs; APFO t 1.0 -> 0.2 (paper stage 1), CFG 7.5 (threestudio VSD)."""
    lr_grid: float = 1e-2
    """Adam(W) lr of the hash grid: the NeRF's, or the mesh's colour field's (threestudio prolificdreamer)."""
    lr_mlp: float = 1e-3
    """Adam(W) lr of the density / albedo MLPs, or the mesh's colour MLP (threestudio)."""
    lr_background: float = 1e-3
    """Adam(W) lr of the background MLP (threestudio)."""
    betas: Tuple[float, float] = (0.9, 0.99)
    """Adam(W) betas (threestudio prolificdreamer)."""
    adam_eps: float = 1e-15
    """Adam(W) eps (threestudio prolificdreamer)."""
    camera: CameraConfig = field(default_factory=CameraConfig)
    """Random cameras: distance 1.0-1.5 (x 1/tan(fovy/2)), fovy 40-70, elevation -10..45 (threestudio)."""
