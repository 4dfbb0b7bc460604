"""The guidance interface shared by APFO (DreamFlow), SDS and VSD.

A guidance turns latents of the current renders into a loss whose gradient moves the 3D scene.
All three methods share one call signature, so stages compare them on equal terms::

    guidance = make_guidance(denoiser, GuidanceConfig(method="apfo"), total_updates=2500, seed=0)
    out = guidance(latents, embeds, camera, step)      # GuidanceOutput
    out.loss.backward()                                # moves the scene through the latents

Every method writes its update as a stop-gradient target (threestudio's formulation):
``loss = 0.5 * ||x - stopgrad(x - g)||^2 / B`` has gradient ``g / B`` w.r.t. ``x``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from ..errors import check
from ..seeding import derived_seed

METHODS = ("apfo", "sds", "vsd")


def _lora_config_default():
    from ..denoisers.scene import SceneLoRAConfig

    return SceneLoRAConfig()


@dataclass
class GuidanceConfig:
    """Settings of a guidance method (one config for all three; fields a method does not use are ignored)."""

    method: str = "apfo"
    """"apfo" (DreamFlow, default), "sds" (DreamFusion) or "vsd" (ProlificDreamer)."""
    cfg_scale: float = 7.5
    """Classifier-free guidance scale of the pretrained model (ProlificDreamer / threestudio VSD: 7.5;
    DreamFusion's SDS used 100)."""
    t_start: float = 1.0
    """APFO: first timestep of the schedule; SDS/VSD: largest random t. Fraction of the 1000 training steps."""
    t_end: float = 0.2
    """APFO: last timestep; SDS/VSD: smallest random t. Stage 1: 1.0 -> 0.2 (paper)."""
    updates_per_t: int = 4
    """APFO: updates sharing one timestep t_i, each on fresh random views (ours)."""
    spacing: str = "linear"
    """APFO: schedule spacing, "linear" in t (ours) or "sigma" (linear in EDM sigma)."""
    weighting: str = "sds"
    """SDS/VSD weight w(t): "sds" = 1 - alpha_bar(t) (threestudio) or "uniform" = 1."""
    lora: object = field(default_factory=_lora_config_default)
    """APFO/VSD: the scene LoRA (SceneLoRAConfig: rank 4, lr 1e-4, camera-conditioned; threestudio VSD)."""
    lora_steps_per_update: int = 1
    """APFO/VSD: LoRA optimiser steps per scene update (threestudio: 1)."""

    def validate(self) -> "GuidanceConfig":
        check(self.method in METHODS, f"guidance method '{self.method}' is unknown; use one of: {', '.join(METHODS)}")
        check(self.cfg_scale >= 1.0, f"cfg_scale={self.cfg_scale} must be >= 1 (1 = no classifier-free guidance)")
        check(0.0 <= self.t_end < self.t_start <= 1.0,
              f"t_start={self.t_start} must be greater than t_end={self.t_end}, both in [0, 1]; e.g. 1.0 -> 0.2")
        check(self.updates_per_t >= 1, f"updates_per_t={self.updates_per_t} must be >= 1")
        check(self.weighting in ("sds", "uniform"), f"weighting '{self.weighting}' is unknown; use sds or uniform")
        check(self.lora_steps_per_update >= 0, f"lora_steps_per_update={self.lora_steps_per_update} must be >= 0")
        return self


@dataclass
class GuidanceOutput:
    """What one guidance call returns.

    Attributes:
        loss: scalar, differentiable w.r.t. the latents it was given.
        target: [B, C, h, w] the stop-gradient target x_hat (detached).
        log: diagnostics for plots, 0-dim tensors or floats (no host sync in the loop):
            ``t``, ``sigma``, ``grad_norm`` (mean over views of ||x - x_hat||), and per method
            ``sigma_next`` (APFO), ``lora_loss`` (APFO/VSD).
    """

    loss: torch.Tensor
    target: torch.Tensor
    log: Dict[str, object]


class Guidance:
    """Base class: holds the denoiser, the config, a seeded noise generator and optionally the scene LoRA."""

    name = "base"
    uses_scene_lora = False

    def __init__(self, denoiser, config: GuidanceConfig, total_updates: int, seed: int = 0):
        self.denoiser = denoiser
        self.config = config.validate()
        self.total_updates = int(total_updates)
        check(self.total_updates >= 1, f"iterations={total_updates} must be >= 1")
        self.generator = torch.Generator(device=denoiser.device).manual_seed(derived_seed(seed, 0))
        self.scene = None
        if self.uses_scene_lora:
            from ..denoisers.scene import SceneDenoiser

            self.scene = SceneDenoiser(denoiser, config.lora, seed=derived_seed(seed, 1))

    # -- helpers shared by the methods -------------------------------------------------------
    def _t(self, value, batch: int) -> torch.Tensor:
        return torch.full((batch,), float(value), device=self.denoiser.device, dtype=torch.float32)

    def _random_t(self, batch: int) -> torch.Tensor:
        """t ~ U[t_end, t_start] per view (SDS/VSD; threestudio samples one t per batch element)."""
        lo, hi = self.config.t_end, self.config.t_start
        u = torch.rand(batch, generator=self.generator, device=self.denoiser.device)
        return lo + (hi - lo) * u

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)

    def _weight(self, t: torch.Tensor) -> torch.Tensor:
        if self.config.weighting == "uniform":
            return torch.ones_like(t)
        return 1.0 - self.denoiser.alpha_bar(t)

    @torch.no_grad()
    def _noisy_prediction(self, x: torch.Tensor, t: torch.Tensor, embeds):
        """Noise ``x`` at ``t`` with a seeded eps; return (eps, x_t, eps_pretrained with CFG), no grad."""
        eps = self._noise(x)
        x_t = self.denoiser.add_noise(x.detach(), eps, t)
        eps_pretrained = self.denoiser.predict_eps(x_t, t, embeds, self.config.cfg_scale).float()
        return eps, x_t, eps_pretrained

    @staticmethod
    def target_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """``0.5 * ||x - stopgrad(x_hat)||^2`` summed per view, averaged over views."""
        return 0.5 * (x - x_hat.detach()).pow(2).sum() / x.shape[0]

    def _train_lora(self, x: torch.Tensor, embeds, camera, t: Optional[torch.Tensor]):
        loss = None
        for _ in range(self.config.lora_steps_per_update):
            loss = self.scene.train_step(x.detach(), embeds, camera, t=t, generator=self.generator)
        return loss

    # -- interface ------------------------------------------------------------------------------
    def __call__(self, latents: torch.Tensor, embeds, camera: Optional[torch.Tensor], step: int) -> GuidanceOutput:
        """Loss for ``latents`` [B, C, h, w] at update ``step`` (embeds: PromptEmbeds of B views; camera [B, 16])."""
        raise NotImplementedError

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        """Tensors needed to resume (the scene LoRA), empty for SDS."""
        return {} if self.scene is None else self.scene.state_tensors()

    def load_state_tensors(self, tensors: Dict[str, torch.Tensor]) -> None:
        if self.scene is not None and tensors:
            self.scene.load_state_tensors(tensors)

    def close(self) -> None:
        """Remove the scene LoRA from the shared UNet (restores it exactly as loaded)."""
        if self.scene is not None:
            self.scene.remove()
            self.scene = None


def make_guidance(denoiser, config: GuidanceConfig, total_updates: int, seed: int = 0) -> Guidance:
    """Build the guidance named by ``config.method``."""
    from .apfo import APFOGuidance
    from .sds import SDSGuidance
    from .vsd import VSDGuidance

    config.validate()
    cls = {"apfo": APFOGuidance, "sds": SDSGuidance, "vsd": VSDGuidance}[config.method]  # validated above
    return cls(denoiser, config, total_updates, seed)
