"""Shading shared by the volume renderer and the mesh rasterizer: Lambertian + ambient, random point lights.

DreamFusion (Poole et al. 2022, sec. 3.1) shades the albedo with a random point light near the camera
and, to stop the model painting geometry into the texture, sometimes renders "textureless" (white
albedo). Values and probabilities are threestudio's (``models/materials/diffuse_with_point_light_material.py``
and ``data/uncond.py``). Backend-agnostic: everything works on any [..., 3] tensors on any device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import check

SHADING_MODES = ("albedo", "lambertian", "textureless")


@dataclass
class ShadingConfig:
    """Random shading for training (threestudio ``diffuse-with-point-light-material`` + ``uncond`` data)."""

    ambient: float = 0.1
    """Ambient light intensity k_a (threestudio ``ambient_light_color`` 0.1)."""
    diffuse: float = 0.9
    """Point-light intensity k_d (threestudio ``diffuse_light_color`` 0.9)."""
    albedo_prob: float = 0.25
    """P(mode = albedo): threestudio ``1 - diffuse_prob`` with diffuse_prob 0.75."""
    textureless_prob: float = 0.375
    """P(mode = textureless): threestudio ``diffuse_prob * textureless_prob`` = 0.75 * 0.5; lambertian gets the rest."""
    ambient_only_steps: int = 1000
    """Updates at the start rendered with albedo only, while the geometry forms (threestudio)."""
    light_distance_range: Tuple[float, float] = (0.8, 1.5)
    """Light distance from the origin, world units (threestudio ``light_distance_range``)."""
    light_position_perturb: float = 1.0
    """Std of the Gaussian added to the camera position before taking the light direction, world units
    (threestudio ``light_position_perturb``, "dreamfusion" strategy; ~0.3 rad at the usual camera distance 3)."""

    def validate(self) -> "ShadingConfig":
        check(self.albedo_prob >= 0 and self.textureless_prob >= 0 and self.albedo_prob + self.textureless_prob <= 1.0,
              f"shading probabilities albedo={self.albedo_prob} textureless={self.textureless_prob} must be >= 0 "
              f"and sum to <= 1 (lambertian gets the rest)")
        lo, hi = self.light_distance_range
        check(0 < lo <= hi, f"light_distance_range {self.light_distance_range} must be 0 < low <= high")
        return self


def shade(albedo: Optional[torch.Tensor], normal: Optional[torch.Tensor], light_dir: Optional[torch.Tensor],
          ambient: float = 0.1, diffuse: float = 0.9, mode: str = "lambertian") -> torch.Tensor:
    """Lambertian + ambient shading.

    ``textureless = k_a + k_d * max(0, n . l)``; ``lambertian = albedo * textureless``; ``albedo = albedo``.

    Args:
        albedo: [..., 3] in [0, 1] (clamped, as threestudio); unused for "textureless" (may be None there).
        normal: [..., 3] unit normals (world); unused for "albedo".
        light_dir: [..., 3] unit directions from the surface point towards the light (broadcastable).
        ambient, diffuse: k_a, k_d (threestudio 0.1 / 0.9).
        mode: one of ``SHADING_MODES``.
    Returns:
        [..., 3] colour (in [0, 1] when k_a + k_d <= 1).
    """
    check(mode in SHADING_MODES, f"shading mode '{mode}' is unknown; use one of: {', '.join(SHADING_MODES)}")
    if mode == "albedo":
        return albedo
    n_dot_l = (normal * light_dir).sum(-1, keepdim=True).clamp_min(0.0)
    textureless = ambient + diffuse * n_dot_l
    if mode == "textureless":
        return textureless.expand(*textureless.shape[:-1], 3)
    return albedo.clamp(0.0, 1.0) * textureless


def light_directions(light_positions: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Unit directions from ``points`` [..., 3] to point lights ``light_positions`` (broadcastable [..., 3])."""
    return F.normalize(light_positions - points, dim=-1)


def random_light(cameras, generator: Optional[torch.Generator] = None,
                 config: Optional[ShadingConfig] = None) -> torch.Tensor:
    """Random point lights near each camera (threestudio "dreamfusion" light sampling).

    ``dir = normalize(camera_position + N(0, perturb^2 I))``, ``distance ~ U(light_distance_range)``.

    Args:
        cameras: a :class:`~dreamflow.render.cameras.Cameras` or its [V, 3] camera centres, world units.
        generator: CPU generator. The draws happen on the CPU (the same numbers on every device) and go to
            the cameras' device without a host sync; the light is computed there.
    Returns:
        [V, 3] float32 light positions on the cameras' device, world units.
    """
    cfg = (config or ShadingConfig()).validate()
    camera_positions = cameras if isinstance(cameras, torch.Tensor) else cameras.position
    V = camera_positions.shape[0]
    lo, hi = cfg.light_distance_range
    distance = lo + (hi - lo) * torch.rand(V, generator=generator)
    jitter = torch.randn(V, 3, generator=generator) * cfg.light_position_perturb
    dev = camera_positions.device
    # Host -> device copies of fresh CPU tensors never sync (pageable memory is staged at the call); the
    # positions stay where they are (a device -> host copy would wait for the GPU).
    nb = dev.type == "cuda"
    distance, jitter = distance.to(dev, non_blocking=nb), jitter.to(dev, non_blocking=nb)
    direction = F.normalize(camera_positions.detach().float() + jitter, dim=-1)
    return direction * distance[:, None]


def pick_mode(config: Optional[ShadingConfig] = None, step: int = 0, generator: Optional[torch.Generator] = None) -> str:
    """Draw the shading mode of one update (one mode for the whole batch, as threestudio).

    Returns "albedo" during the first ``ambient_only_steps`` updates, then albedo / textureless /
    lambertian with the configured probabilities.
    """
    cfg = (config or ShadingConfig()).validate()
    if step < cfg.ambient_only_steps:
        return "albedo"
    u = float(torch.rand((), generator=generator))
    if u < cfg.albedo_prob:
        return "albedo"
    if u < cfg.albedo_prob + cfg.textureless_prob:
        return "textureless"
    return "lambertian"
