"""APFO: approximate probability-flow ODE guidance (DreamFlow; Lee, Sohn & Shin, ICLR 2024).

Paper symbols -> code:

* t_i, t_{i+1}: consecutive points of the predetermined decreasing schedule (``TimestepSchedule``).
* sigma_i = sqrt((1 - alpha_bar(t_i)) / alpha_bar(t_i)): EDM noise level of t_i (``Denoiser.sigma``).
* x: latents of the current renders; x_t = sqrt(alpha_bar) x + sqrt(1 - alpha_bar) eps, eps ~ N(0, I).
* eps_pretrained: the pretrained denoiser's CFG prediction at (x_t, t_i, prompt).
* eps_scene: the scene LoRA's prediction at (x_t, t_i, prompt, camera): the score of the current 3D
  scene's render distribution (ProlificDreamer's VSD particle model).

One Euler step of the probability-flow ODE that carries the render distribution (modelled by
eps_scene) to the text-conditioned data distribution (eps_pretrained), from sigma_i to sigma_{i+1}::

    x_hat = x - (sigma_i - sigma_{i+1}) * (eps_pretrained - eps_scene)
    loss  = 0.5 * ||x - stopgrad(x_hat)||^2

The gradient w.r.t. x is (sigma_i - sigma_{i+1}) (eps_pretrained - eps_scene): it moves the 3D model so
that its renders take that step. The LoRA is trained on the current renders at the same t_i, so it
tracks the scene as the scene moves. ``updates_per_t`` updates (on fresh random views) share each t_i.
With ``GuidanceConfig.lora_shares_noise`` (the default) the LoRA's first step uses the very x_t of the target, so
one scene-model forward gives eps_scene and the LoRA's loss ||eps_phi(x_t) - eps||^2 (ProlificDreamer's Algorithm 1
draws once for both updates too); eps_scene is read before that step changes the LoRA. With it off, the LoRA step
draws fresh noise at the same t_i and runs a forward of its own (threestudio's way).
"""

from __future__ import annotations

import torch

from .base import Guidance, GuidanceOutput, register
from .schedule import TimestepSchedule


@register
class APFOGuidance(Guidance):
    """DreamFlow's guidance. Deterministic given the seed: the schedule is fixed, noise is seeded."""

    name = "apfo"
    order = 0
    summary = "DreamFlow's approximate probability flow (decreasing t schedule)"
    uses_scene_lora = True

    def __init__(self, denoiser, config, total_updates: int, seed: int = 0):
        super().__init__(denoiser, config, total_updates, seed)
        self.schedule = TimestepSchedule(config.t_start, config.t_end, self.total_updates,
                                         config.updates_per_t, config.spacing)
        self._step_unit = 1.0
        if config.step_scale == "mean":  # the mean ODE step (sigma(t_start) - sigma(t_end)) / n, any spacing
            sig = denoiser.sigma(torch.tensor([config.t_start, config.t_end], device=denoiser.device))
            self._step_unit = float(sig[0] - sig[1]) / self.schedule.n_levels

    def timesteps(self, step: int):
        """(t_i, t_{i+1}) for update ``step``."""
        return self.schedule.at(step, self.denoiser.sigma)

    def __call__(self, latents, embeds, camera, step: int) -> GuidanceOutput:
        x = latents.float()
        B = x.shape[0]
        t_i, t_next = self.timesteps(step)
        t = self._t(t_i, B)
        sigma_i = self.denoiser.sigma(t)
        sigma_next = self.denoiser.sigma(self._t(t_next, B))
        if self.config.lora_shares_noise and self.config.lora_steps_per_update > 0:
            # One scene-model forward: eps_phi for the target and the first LoRA step's loss, at the same x_t
            # (the scene model waits for that forward before the CFG call below is queued).
            eps, x_t = self._noisy(x, t)
            eps_scene = self.scene_model.eps(x_t, t, embeds, camera, share=(x, eps, self.generator))
            eps_pretrained = self._pretrained_eps(x_t, t, embeds)
        else:
            _, x_t, eps_pretrained = self._noisy_prediction(x, t, embeds)
            eps_scene = self.scene_model.eps(x_t, t, embeds, camera)
        with torch.no_grad():
            delta = (sigma_i - sigma_next).view(B, 1, 1, 1) / self._step_unit
            x_hat = x.detach() - delta * (eps_pretrained - eps_scene)
        loss = self.target_loss(x, x_hat)
        lora_loss = self.scene_model.step(x, embeds, camera, t, self.generator, self.config.lora_steps_per_update)
        log = {"t": t_i, "t_next": t_next, "sigma": sigma_i[0].detach(), "sigma_next": sigma_next[0].detach(),
               "grad_norm": (x.detach() - x_hat).flatten(1).norm(dim=1).mean(), "lora_loss": lora_loss}
        return GuidanceOutput(loss=loss, target=x_hat, log=log)
