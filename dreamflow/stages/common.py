"""What every optimisation stage's config shares (:class:`StageConfig`): the schedule's size, the views, the seed,
the guidance (method and its knobs) and the learning rates of the parts every stage optimises.

The stages' configs (``NeRFStageConfig``, ``MeshStageConfig``, ``RefineConfig``) derive from it and redeclare a
field only where their default differs (e.g. the mesh stage's resolution and APFO range).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Tuple, TypeVar

from ..guidance import GuidanceConfig
from ..render.cameras import CameraConfig

log = logging.getLogger("dreamflow")
C = TypeVar("C", bound="StageConfig")


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


def fit_views(config: C, denoiser, stage: str) -> C:
    """``config`` as the denoiser's memory preset runs it (``MemoryConfig.max_view_pixels``): when
    ``views_per_update x denoise_resolution^2`` exceeds the preset's limit, fewer views per update (a divisor of
    ``views_per_update``) and ``iterations`` and ``guidance.updates_per_t`` times ``views / views'``: the same
    view-updates and the same timestep schedule (each t_i still sees the same number of views). Logged; a config
    within the limit (or a denoiser without a preset) is returned as it is, so fitting twice changes nothing."""
    from ..denoisers.memory import preset_name, views_that_fit

    memory = getattr(denoiser, "memory", None)
    if memory is None:
        return config
    views, factor = views_that_fit(config.views_per_update, config.denoise_resolution, memory)
    if factor == 1:
        return config
    guidance = dataclasses.replace(config.guidance, updates_per_t=config.guidance.updates_per_t * factor)
    fitted = dataclasses.replace(config, views_per_update=views, iterations=config.iterations * factor,
                                 guidance=guidance)
    log.info("dreamflow: %s: memory preset '%s' runs %d view(s) x %d updates instead of %d x %d (the same %d "
             "view-updates; updates_per_t %d -> %d; max_view_pixels %d)", stage, preset_name(memory), views,
             fitted.iterations, config.views_per_update, config.iterations, views * fitted.iterations,
             config.guidance.updates_per_t, guidance.updates_per_t, memory.max_view_pixels)
    return fitted
