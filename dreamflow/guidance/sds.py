"""SDS: score distillation sampling (DreamFusion; Poole et al., ICLR 2023), baseline.

Random t ~ U[t_end, t_start] per view, eps ~ N(0, I), x_t = sqrt(a) x + sqrt(1 - a) eps::

    g = w(t) * (eps_pretrained(x_t, t, y; CFG) - eps),   w(t) = 1 - alpha_bar(t)  (threestudio)
    x_hat = x - g;  loss = 0.5 * ||x - stopgrad(x_hat)||^2

Pretrained model only. DreamFusion used CFG 100; the stages default to the same CFG for every
method so the comparison is on equal terms (set ``cfg_scale`` per run to reproduce DreamFusion).
"""

from __future__ import annotations

import torch

from .base import Guidance, GuidanceOutput, register


@register
class SDSGuidance(Guidance):
    name = "sds"
    order = 1
    summary = "DreamFusion score distillation"
    uses_scene_lora = False

    def __call__(self, latents, embeds, camera, step: int) -> GuidanceOutput:
        x = latents.float()
        B = x.shape[0]
        t = self._random_t(B)
        eps, x_t, eps_pretrained = self._noisy_prediction(x, t, embeds)
        with torch.no_grad():
            g = self._weight(t).view(B, 1, 1, 1) * (eps_pretrained - eps)
            x_hat = x.detach() - g
        loss = self.target_loss(x, x_hat)
        log = {"t": t.mean().detach(), "sigma": self.denoiser.sigma(t).mean().detach(),
               "grad_norm": g.flatten(1).norm(dim=1).mean()}
        return GuidanceOutput(loss=loss, target=x_hat, log=log)
