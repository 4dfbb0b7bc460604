"""Stage 1 (NeRFStage): optimise a hash-grid NeRF at 256 px with APFO, t 1.0 -> 0.2 (paper defaults).

``run_nerf_stage(denoiser, prompt, negative_prompt, config)`` -> :class:`~dreamflow.state.NeRFState`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .. import config as cfgio
from ..errors import check, explain_memory
from ..guidance import GuidanceConfig
from ..hosting import Callbacks
from ..render.occupancy import OccupancyConfig, OccupancyGrid
from ..render.shading import ShadingConfig, pick_mode, random_light
from ..render.volume import VolumeRenderConfig, opaque_loss, orientation_loss, render_volume, sparsity_loss
from ..scene.nerf import Background, BackgroundConfig, NeRFField, NeRFFieldConfig
from ..state import NeRFState, require_state
from ..seeding import SEED_HOST_CHOICES, SEED_RENDER, derived_seed, seeded
from .common import StageConfig, fit_views
from .loop import autograd_on, optimise


def check_denoiser(denoiser, kind: str, config, stage: str) -> None:
    """The denoiser is of the stage's kind and can take ``config.denoise_resolution``.

    The size must be a multiple of the VAE factor times the UNet's downsampling (SD: 8 x 8 = 64 px), so
    latents pass the UNet's down/up blocks without resizing.
    """
    from ..denoisers import require_kind

    require_kind(denoiser, kind, stage)
    levels = len(getattr(getattr(denoiser.unet, "config", None), "block_out_channels", (0,)))
    multiple = int(denoiser.vae_scale_factor) * 2 ** max(levels - 1, 0)
    r = int(config.denoise_resolution)
    check(r % multiple == 0, f"{stage}: denoise_resolution={r} is not a multiple of {multiple} px, which "
          f"'{denoiser.name}' needs (VAE x UNet downsampling); use {max(multiple, round(r / multiple) * multiple)} "
          f"(native: {denoiser.native_resolution})")


def check_prompt(prompt: str, stage: str) -> str:
    check(isinstance(prompt, str) and prompt.strip() != "", f"{stage}: the prompt is empty; describe the object, e.g. 'a corgi standing up drinking boba'")
    return prompt.strip()


def check_common(cfg, stage: str) -> None:
    """Checks shared by every stage config (raised before any heavy work)."""
    cfgio.check_finite(cfg, stage)
    check(int(cfg.iterations) >= 1, f"{stage}: iterations={cfg.iterations} must be >= 1")
    check(int(cfg.views_per_update) >= 1, f"{stage}: views_per_update={cfg.views_per_update} must be >= 1")
    check(int(cfg.resolution) >= 16, f"{stage}: resolution={cfg.resolution} must be >= 16 px")
    check(int(cfg.denoise_resolution) >= 8, f"{stage}: denoise_resolution={cfg.denoise_resolution} must be >= 8 px")
    for name in [n for n in vars(cfg) if n.startswith("lr_")]:
        check(float(getattr(cfg, name)) >= 0, f"{stage}: {name}={getattr(cfg, name)} must be >= 0")
    cfg.guidance.validate()
    cfg.camera.validate()


@dataclass
class NeRFStageConfig(StageConfig):
    """Stage 1 settings. Defaults: paper (256 px, t 1.0 -> 0.2) and threestudio prolificdreamer.yaml; the common
    part (iterations, views, seed, guidance, learning rates, cameras) is :class:`~dreamflow.stages.common.StageConfig`."""

    lambda_sparsity: float = 10.0
    """Weight of the opacity sparsity loss (threestudio prolificdreamer ``lambda_sparsity``)."""
    lambda_orient: float = 0.0
    """Weight of DreamFusion's orientation loss (threestudio prolificdreamer: 0; needs normals)."""
    lambda_opaque: float = 0.0
    """Weight of the opacity-entropy loss (threestudio ``lambda_opaque``, off in prolificdreamer): pushes every pixel's
    opacity to 0 or 1, against the soft, hazy densities of short runs."""
    nerf: NeRFFieldConfig = field(default_factory=NeRFFieldConfig)
    """The NeRF field (hash grid 16 x 2, 2^19, base 16, scale 1.4473; threestudio prolificdreamer)."""
    background: BackgroundConfig = field(default_factory=BackgroundConfig)
    """View-direction MLP background with random solid-colour augmentation (threestudio)."""
    render: VolumeRenderConfig = field(default_factory=VolumeRenderConfig)
    """Volume rendering: 64 coarse + 64 importance samples per ray (NeRF hierarchical sampling)."""
    occupancy: OccupancyConfig = field(default_factory=OccupancyConfig)
    """Occupancy-grid pruning of empty space (32^3, refreshed every 16 updates; threestudio ``grid_prune``)."""
    shading: ShadingConfig = field(default_factory=lambda: ShadingConfig(albedo_prob=1.0, textureless_prob=0.0))
    """Stage 1 renders albedo only (threestudio prolificdreamer: ``no-material``); raise the lambertian /
    textureless probabilities for DreamFusion-style shading."""

    def validate(self) -> "NeRFStageConfig":
        check_common(self, "NeRFStage")
        for name in ("lambda_sparsity", "lambda_orient", "lambda_opaque"):
            check(getattr(self, name) >= 0, f"NeRFStage: {name}={getattr(self, name)} must be >= 0 (0 = off)")
        self.nerf.validate()
        self.render.validate()
        self.occupancy.validate()
        self.shading.validate()
        return self


@autograd_on
def run_nerf_stage(denoiser, prompt: str, negative_prompt: str = "", config: Optional[NeRFStageConfig] = None,
                   callbacks: Optional[Callbacks] = None, init: Optional[NeRFState] = None) -> NeRFState:
    """Optimise a NeRF so its renders follow the denoiser's probability flow for ``prompt``.

    Args:
        denoiser: a loaded ``Denoiser`` of kind "sd" (SD 1.x / 2.x or the toy prior).
        prompt / negative_prompt: text; view words ("front / side / back view") are appended per view.
        config: :class:`NeRFStageConfig` (validated before any work).
        callbacks: progress / preview / interrupt hooks (``dreamflow.hosting``).
        init: a NeRFState to continue from (its field, background and scene LoRA).
    Returns:
        NeRFState on the denoiser's device.
    """
    config = (config or NeRFStageConfig()).validate()
    prompt = check_prompt(prompt, "NeRFStage")
    check_denoiser(denoiser, "sd", config, "NeRFStage")
    config = fit_views(config, denoiser, "NeRFStage")
    if init is not None:
        require_state(init, NeRFState, "NeRFStage init", "connect a NeRF stage's or Load State's 'nerf' output")
    device = denoiser.device
    with seeded(config.seed), explain_memory("NeRFStage", "grid_log2_size / grid_levels (the hash grid's size)"):
        if init is not None:
            copy = init.clone()
            field_, background = copy.field, copy.background
        else:
            field_, background = NeRFField(config.nerf), Background(config.background)
        field_.to(device).train()
    background.to(device).train()
    optimizer = torch.optim.AdamW(field_.param_groups(config.lr_grid, config.lr_mlp)
                                  + background.param_groups(config.lr_background),
                                  betas=tuple(config.betas), eps=config.adam_eps, weight_decay=0.0)
    gen = torch.Generator().manual_seed(derived_seed(config.seed, SEED_HOST_CHOICES))  # shading mode, light
    # On CUDA, render jitter, background colours and grid refreshes draw on the device: a CPU draw would be copied
    # over with a stream sync at every update. On the CPU there is no sync to save, and sharing ``gen`` keeps CPU
    # runs drawing what they drew before (as the mesh stages do).
    render_gen = gen if device.type == "cpu" else torch.Generator(device=device).manual_seed(
        derived_seed(config.seed, SEED_RENDER))
    need_normal = config.lambda_orient > 0
    # Built fresh from the current field (also when resuming): not part of the saved state.
    grid = OccupancyGrid.from_field(field_, config.occupancy, render_gen) if config.occupancy.enabled else None

    def render_fn(cams, step):
        mode = pick_mode(config.shading, step, gen)
        lights = random_light(cams, gen, config.shading) if mode != "albedo" else None
        out = render_volume(field_, lambda d: background(d, generator=render_gen), cams, config.render, shading=mode,
                            light_positions=lights, shading_config=config.shading,
                            need_normal=need_normal or None, generator=render_gen, occupancy=grid)
        reg = config.lambda_sparsity * sparsity_loss(out["opacity"])
        if config.lambda_opaque > 0:
            reg = reg + config.lambda_opaque * opaque_loss(out["opacity"])
        if need_normal and out.get("sample_normal") is not None:
            reg = reg + config.lambda_orient * orientation_loss(out["weights"], out["sample_normal"], out["ray_dirs"])
        return out["rgb"], reg

    def on_step(step):
        # nerfacc update_every_n_steps before the render of update step + 1 (threestudio updates before rendering)
        if grid is not None:
            grid.update(field_, step + 1, render_gen)

    settings = cfgio.to_dict(config)
    previous_log = list(init.guidance_log) if init is not None else []
    history = (list(init.history) if init is not None else []) + ["NeRFStage"]

    def snapshot(log):
        return NeRFState(field=field_, background=background, prompt=prompt, negative_prompt=negative_prompt,
                         settings=settings, guidance_log=previous_log + [dict(r, stage="NeRFStage") for r in log],
                         history=history)

    result = optimise(stage="NeRFStage", denoiser=denoiser, prompt=prompt, negative_prompt=negative_prompt,
                      config=config, render_fn=render_fn, optimizer=optimizer, snapshot=snapshot,
                      callbacks=callbacks, guidance_state=init.lora if init is not None else None,
                      on_step=on_step)
    field_.eval()
    background.eval()
    state = snapshot(result.log)
    state.lora = result.guidance_state
    return state
