"""Cameras shared by every stage: a random sampler, orbit (turntable) cameras, rays, projections.

Conventions (used by every renderer and exporter in DreamFlow):

* World: right-handed, **+Y up**, the object centred at the origin inside the cube [-1, 1]^3, its
  front facing **+Z** (as glTF expects). Azimuth 0 deg puts the camera on +Z (front view), azimuth
  +90 deg on +X; elevation is measured up from the XZ plane.
* Camera: OpenGL style: looks down its own -Z, +Y up, +X right. ``c2w`` is camera-to-world [V, 4, 4].
* Images: [V, H, W, C] float in [0, 1], row 0 at the top (as ComfyUI's IMAGE and PIL).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import check


@dataclass
class CameraConfig:
    """Random-camera distribution (defaults: threestudio ``configs/prolificdreamer.yaml``)."""

    distance_range: Tuple[float, float] = (1.0, 1.5)
    """Camera distance; with ``relative_radius`` it is multiplied by 1 / tan(fovy / 2) (threestudio)."""
    fovy_range: Tuple[float, float] = (40.0, 70.0)
    """Vertical field of view, degrees."""
    elevation_range: Tuple[float, float] = (-10.0, 45.0)
    """Elevation above the XZ plane, degrees."""
    azimuth_range: Tuple[float, float] = (-180.0, 180.0)
    """Azimuth, degrees; stratified over the views of one update (threestudio ``batch_uniform_azimuth``)."""
    relative_radius: bool = True
    """Scale distance by 1 / tan(fovy / 2) so the object covers a similar part of the frame at every fovy."""
    center_perturb: float = 0.2
    """Std of the look-at point's random offset, world units (threestudio ``center_perturb``)."""
    camera_perturb: float = 0.1
    """Std of the camera position's random offset, world units (threestudio ``camera_perturb``)."""
    up_perturb: float = 0.02
    """Std of the up vector's random offset (threestudio ``up_perturb``)."""
    front_threshold: float = 30.0
    """|azimuth| below this (degrees) is a front view, above 180 - this a back view (threestudio
    prolificdreamer.yaml: front_threshold = back_threshold = 30)."""
    overhead_threshold: float = 60.0
    """Elevation above this (degrees) is an overhead view (threestudio)."""

    def validate(self) -> "CameraConfig":
        for name in ("distance_range", "fovy_range", "elevation_range", "azimuth_range"):
            lo, hi = getattr(self, name)
            check(lo <= hi, f"camera {name} {lo}..{hi} is reversed; give low..high")
        check(self.distance_range[0] > 0, f"camera distance {self.distance_range} must be > 0")
        check(0 < self.fovy_range[0] and self.fovy_range[1] < 180, f"camera fovy {self.fovy_range} must be in (0, 180) degrees")
        return self


VIEW_WORDS = ("front", "side", "back", "overhead")


@dataclass
class Cameras:
    """A batch of V pinhole cameras.

    Attributes:
        c2w: [V, 4, 4] camera-to-world (OpenGL camera axes).
        fovy: [V] vertical field of view, radians.
        height, width: image size in pixels.
        elevation, azimuth, distance: [V] degrees / degrees / world units (for view prompts and logs).
    """

    c2w: torch.Tensor
    fovy: torch.Tensor
    height: int
    width: int
    elevation: torch.Tensor
    azimuth: torch.Tensor
    distance: torch.Tensor

    def __len__(self) -> int:
        return self.c2w.shape[0]

    @property
    def device(self) -> torch.device:
        return self.c2w.device

    def to(self, device) -> "Cameras":
        """The cameras on ``device``. Copies to a CUDA device are non-blocking: the host does not wait for
        the GPU (CPU sources are staged at the call, so changing them afterwards is safe)."""
        device = torch.device(device)
        nb = device.type == "cuda"
        return Cameras(*(x.to(device, non_blocking=nb) for x in (self.c2w, self.fovy)), self.height, self.width,
                       *(x.to(device, non_blocking=nb) for x in (self.elevation, self.azimuth, self.distance)))

    def subset(self, index) -> "Cameras":
        """Cameras ``index`` (an int, slice or index tensor) as a new batch."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Cameras(self.c2w[index], self.fovy[index], self.height, self.width,
                       self.elevation[index], self.azimuth[index], self.distance[index])

    def resized(self, height: int, width: Optional[int] = None) -> "Cameras":
        """Same cameras at another image size."""
        return Cameras(self.c2w, self.fovy, height, width or height, self.elevation, self.azimuth, self.distance)

    @property
    def position(self) -> torch.Tensor:
        """[V, 3] camera centres in world space."""
        return self.c2w[:, :3, 3]

    def condition(self) -> torch.Tensor:
        """[V, 16] flattened c2w: the camera condition of the scene LoRA (ProlificDreamer)."""
        return self.c2w.reshape(len(self), 16)

    def focal(self) -> torch.Tensor:
        """[V] focal length in pixels (vertical)."""
        return 0.5 * self.height / torch.tan(0.5 * self.fovy)

    def rays(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """World-space rays through pixel centres: origins and unit directions, each [V, H, W, 3]."""
        V, H, W = len(self), self.height, self.width
        dev, dt = self.c2w.device, self.c2w.dtype
        j = (torch.arange(W, device=dev, dtype=dt) + 0.5) / W * 2 - 1
        i = 1 - (torch.arange(H, device=dev, dtype=dt) + 0.5) / H * 2
        tan = torch.tan(0.5 * self.fovy).view(V, 1, 1)
        x = j.view(1, 1, W) * tan * (W / H)
        y = i.view(1, H, 1) * tan
        d_cam = torch.stack(torch.broadcast_tensors(x, y, -torch.ones_like(x * y)), dim=-1)  # [V,H,W,3]
        d = torch.einsum("vij,vhwj->vhwi", self.c2w[:, :3, :3], d_cam)
        d = F.normalize(d, dim=-1)
        o = self.position.view(V, 1, 1, 3).expand_as(d)
        return o, d

    def projection(self, near: float = 0.1, far: float = 100.0) -> torch.Tensor:
        """[V, 4, 4] OpenGL projection (clip space, NDC y up)."""
        V = len(self)
        P = torch.zeros(V, 4, 4, device=self.device, dtype=self.c2w.dtype)
        t = torch.tan(0.5 * self.fovy)
        aspect = self.width / self.height
        P[:, 0, 0] = 1.0 / (t * aspect)
        P[:, 1, 1] = 1.0 / t
        P[:, 2, 2] = -(far + near) / (far - near)
        P[:, 2, 3] = -2.0 * far * near / (far - near)
        P[:, 3, 2] = -1.0
        return P

    def mvp(self, near: float = 0.1, far: float = 100.0) -> torch.Tensor:
        """[V, 4, 4] world -> clip matrices (projection @ inverse(c2w))."""
        # inv_ex: the same inverse as linalg.inv without its singularity check, which would wait for the GPU
        # (a c2w is rigid, never singular).
        return self.projection(near, far) @ torch.linalg.inv_ex(self.c2w).inverse

    def view_words(self, cfg: Optional[CameraConfig] = None) -> List[str]:
        """One of ``front / side / back / overhead`` per camera (threestudio's view-dependent prompting)."""
        cfg = cfg or CameraConfig()
        words = []
        for e, a in zip(self.elevation.tolist(), self.azimuth.tolist()):
            a = (a + 180.0) % 360.0 - 180.0
            if e > cfg.overhead_threshold:
                words.append("overhead")
            elif abs(a) < cfg.front_threshold:
                words.append("front")
            elif abs(a) > 180.0 - cfg.front_threshold:
                words.append("back")
            else:
                words.append("side")
        return words


def view_prompt(prompt: str, word: str) -> str:
    """``"a corgi" + "side"`` -> ``"a corgi, side view"`` (threestudio's view-dependent suffix)."""
    return f"{prompt.rstrip(' .')}, {word} view"


def look_at(eye: torch.Tensor, center: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """[V, 4, 4] camera-to-world matrices for cameras at ``eye`` looking at ``center`` (all [V, 3])."""
    forward = F.normalize(center - eye, dim=-1)
    right = F.normalize(torch.cross(forward, up, dim=-1), dim=-1)
    true_up = torch.cross(right, forward, dim=-1)
    c2w = torch.zeros(eye.shape[0], 4, 4, dtype=eye.dtype, device=eye.device)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = true_up
    c2w[:, :3, 2] = -forward
    c2w[:, :3, 3] = eye
    c2w[:, 3, 3] = 1.0
    return c2w


def spherical_to_position(elevation_deg, azimuth_deg, distance) -> torch.Tensor:
    """[V, 3] positions for elevation / azimuth (degrees) / distance (Y up, azimuth 0 on +Z)."""
    e = torch.deg2rad(elevation_deg)
    a = torch.deg2rad(azimuth_deg)
    return torch.stack([distance * torch.cos(e) * torch.sin(a), distance * torch.sin(e), distance * torch.cos(e) * torch.cos(a)], -1)


def make_cameras(elevation, azimuth, distance, fovy_deg, height: int, width: Optional[int] = None,
                 center: Optional[torch.Tensor] = None, up: Optional[torch.Tensor] = None,
                 eye_offset: Optional[torch.Tensor] = None) -> Cameras:
    """Cameras from per-view elevation / azimuth (deg), distance, fovy (deg); optional perturbations."""
    elevation, azimuth, distance, fovy_deg = (torch.as_tensor(v, dtype=torch.float32).flatten()
                                              for v in (elevation, azimuth, distance, fovy_deg))
    V = max(elevation.numel(), azimuth.numel(), distance.numel(), fovy_deg.numel())
    elevation, azimuth, distance, fovy_deg = (v.expand(V) if v.numel() == 1 else v for v in (elevation, azimuth, distance, fovy_deg))
    eye = spherical_to_position(elevation, azimuth, distance)
    if eye_offset is not None:
        eye = eye + eye_offset
    center = torch.zeros(V, 3) if center is None else center
    up = torch.tensor([0.0, 1.0, 0.0]).expand(V, 3) if up is None else up
    c2w = look_at(eye, center, up)
    return Cameras(c2w, torch.deg2rad(fovy_deg), height, width or height, elevation, azimuth, distance)


def sample_cameras(cfg: CameraConfig, n_views: int, height: int, width: Optional[int] = None,
                   generator: Optional[torch.Generator] = None) -> Cameras:
    """Draw ``n_views`` random cameras (CPU tensors; move with ``.to``). Deterministic given ``generator``."""
    def u(lo, hi, n=n_views):
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    fovy = u(*cfg.fovy_range)
    elevation = u(*cfg.elevation_range)
    a0, a1 = cfg.azimuth_range
    azimuth = a0 + (a1 - a0) * (torch.rand(n_views, generator=generator) + torch.arange(n_views)) / n_views
    distance = u(*cfg.distance_range)
    if cfg.relative_radius:
        distance = distance / torch.tan(torch.deg2rad(fovy) / 2)
    eye_offset = torch.randn(n_views, 3, generator=generator) * cfg.camera_perturb
    center = torch.randn(n_views, 3, generator=generator) * cfg.center_perturb
    up = torch.tensor([0.0, 1.0, 0.0]) + torch.randn(n_views, 3, generator=generator) * cfg.up_perturb
    return make_cameras(elevation, azimuth, distance, fovy, height, width, center=center, up=up, eye_offset=eye_offset)


def orbit_cameras(n_views: int, height: int, width: Optional[int] = None, elevation: float = 15.0,
                  fovy: float = 45.0, distance: float = 1.25, relative_radius: bool = True,
                  start_azimuth: float = 0.0) -> Cameras:
    """Evenly spaced turntable cameras starting at the front view (for previews and renders)."""
    az = start_azimuth + torch.arange(n_views, dtype=torch.float32) * 360.0 / n_views
    az = (az + 180.0) % 360.0 - 180.0
    d = distance / math.tan(math.radians(fovy) / 2) if relative_radius else distance
    return make_cameras(elevation, az, d, fovy, height, width)
