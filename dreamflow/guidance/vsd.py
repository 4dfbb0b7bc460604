"""VSD: variational score distillation (ProlificDreamer; Wang et al., NeurIPS 2023), baseline.

Random t ~ U[t_end, t_start] per view::

    g = w(t) * (eps_pretrained(x_t, t, y; CFG) - eps_scene(x_t, t, y, camera)),   w(t) = 1 - alpha_bar(t)
    x_hat = x - g;  loss = 0.5 * ||x - stopgrad(x_hat)||^2

The scene LoRA is trained on the current renders at its own random t ~ U[lora.t_range] (threestudio
trains it on U[0, 1000)), camera-conditioned with 10% camera dropout.
"""

from __future__ import annotations

import torch

from .base import Guidance, GuidanceOutput, register


@register
class VSDGuidance(Guidance):
    name = "vsd"
    order = 2
    summary = "ProlificDreamer variational score distillation (scene LoRA)"
    uses_scene_lora = True

    def __call__(self, latents, embeds, camera, step: int) -> GuidanceOutput:
        x = latents.float()
        B = x.shape[0]
        t = self._random_t(B)
        _, x_t, eps_pretrained = self._noisy_prediction(x, t, embeds)
        eps_scene = self.scene_model.eps(x_t, t, embeds, camera)
        with torch.no_grad():
            g = self._weight(t).view(B, 1, 1, 1) * (eps_pretrained - eps_scene)
            x_hat = x.detach() - g
        loss = self.target_loss(x, x_hat)
        lora_loss = self.scene_model.step(x, embeds, camera, None, self.generator, self.config.lora_steps_per_update)
        log = {"t": t.mean().detach(), "sigma": self.denoiser.sigma(t).mean().detach(),
               "grad_norm": g.flatten(1).norm(dim=1).mean(), "lora_loss": lora_loss}
        return GuidanceOutput(loss=loss, target=x_hat, log=log)
