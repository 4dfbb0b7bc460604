"""The toy world of the shipped prior ``dreamflow-toy``: 7 shapes x 6 colours, rendered by the project's renderer.

Shapes: cube, sphere, cone, cylinder, torus and two composites, snowman (three stacked spheres and a dark nose)
and mushroom (a coloured cap on a cream stem). Every shape is a triangle mesh centred at the origin with its
largest extent ~0.45 world units from the centre, inside [-1, 1]^3 (+Y up, front +Z; ``render/cameras.py``), so the
stages' random cameras (``sample_cameras(TOY_CAMERA, ...)``) frame it the way they frame a generated object.

Images are made in two steps, so that colours, light mix and backgrounds cost nothing per image:

1. :func:`render_geometry` renders a shape with :func:`dreamflow.render.mesh_render.render_mesh` (rasterize,
   interpolate, anti-alias) twice per camera: albedo mode with one-hot part albedo gives the anti-aliased part
   coverage ``A_k``, Lambertian mode with (k_a, k_d) = (0, 1) and a random point light
   (``shading.random_light``) gives ``L_k = AA(part_k * max(0, n . l))``; plus the opacity ``O``.
2. :func:`compose` forms ``rgb = sum_k c_k (a A_k + (1 - a) L_k) + bg (1 - O)`` for any part colours ``c_k``,
   ambient ``a`` and solid background ``bg``. Anti-aliasing is linear in the image, so this equals rendering
   with albedo ``c_k`` and shading ``k_a = a, k_d = 1 - a`` directly (tested against ``render_mesh``).

Captions are the stages' own prompts: ``view_prompt("a red cube", word)`` -> ``"a red cube, side view"``, with the
view word from ``Cameras.view_words``. Everything is seeded: the same seed gives the same images.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..errors import DreamFlowError
from ..render.cameras import CameraConfig, Cameras, VIEW_WORDS, sample_cameras, view_prompt

SHAPES: Tuple[str, ...] = ("cube", "sphere", "cone", "cylinder", "torus", "snowman", "mushroom")
#: Colour name -> linear RGB albedo in [0, 1] (saturated, distinct hues; ours).
COLOURS: Dict[str, Tuple[float, float, float]] = {
    "red": (0.85, 0.10, 0.10),
    "green": (0.12, 0.70, 0.15),
    "blue": (0.12, 0.25, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.55, 0.15, 0.75),
    "orange": (1.00, 0.50, 0.05),
}
COLOUR_NAMES: Tuple[str, ...] = tuple(COLOURS)
#: Fixed colour of a composite's second part (snowman nose: coal; mushroom stem: cream), RGB in [0, 1].
SECONDARY_COLOURS: Dict[str, Tuple[float, float, float]] = {"snowman": (0.15, 0.15, 0.15),
                                                              "mushroom": (0.93, 0.88, 0.76)}
#: Cameras of the toy world (the prior's training images) and of the toy demo's stages: the stages' defaults
#: (threestudio prolificdreamer) but elevations up to 80 degrees, so that overhead views ("overhead view" above 60,
#: ``CameraConfig.overhead_threshold``) are in the prior's data and guide the tops of objects (a torus's hole is seen
#: only from above; DreamFusion draws elevations up to 90). 80, not 90: at the pole the look-at frame's roll is set
#: by the random up-vector perturbation alone.
TOY_CAMERA = CameraConfig(elevation_range=(-10.0, 80.0))

#: Words of every caption (tokenizer vocabulary of the prior: each is one token).
WORDS: Tuple[str, ...] = ("a", "an") + COLOUR_NAMES + SHAPES + VIEW_WORDS + ("view",)


# --------------------------------------------------------------------------------------------
# Captions and prompts
# --------------------------------------------------------------------------------------------
def caption(shape: str, colour: str) -> str:
    """``("cube", "orange")`` -> ``"an orange cube"`` (article by the colour's first letter)."""
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"


def class_names() -> List[Tuple[str, str]]:
    """All (shape, colour) classes in a fixed order: shape-major, 7 x 6 = 42."""
    return [(s, c) for s in SHAPES for c in COLOUR_NAMES]


_PROMPT_RE = re.compile(r"^(?:an?\s+)?([a-z]+)\s+([a-z]+)$")


def parse_prompt(prompt: str) -> Tuple[str, str]:
    """``"a green cone"`` -> ``("cone", "green")``; a view suffix (", side view") and a final "." are allowed.

    Raises:
        DreamFlowError: the prompt is not "<a|an> <colour> <shape>" of this world (the message lists both).
    """
    text = " ".join(str(prompt or "").lower().replace(".", " ").split())
    text = re.sub(r",\s*(?:%s) view$" % "|".join(VIEW_WORDS), "", text).strip(" ,")
    m = _PROMPT_RE.match(text)
    if m is None or m.group(1) not in COLOURS or m.group(2) not in SHAPES:
        raise DreamFlowError(
            f"prompt '{prompt}' is outside the toy world of the shipped prior 'dreamflow-toy'; write "
            f"'a <colour> <shape>' with colour one of: {', '.join(COLOUR_NAMES)} and shape one of: "
            f"{', '.join(SHAPES)} (e.g. 'a green cone'), or load a Stable Diffusion model for other prompts")
    return m.group(2), m.group(1)


# --------------------------------------------------------------------------------------------
# Meshes
# --------------------------------------------------------------------------------------------
def _revolve(profile: Sequence[Tuple[float, float]], n_seg: int) -> Tuple[Tensor, Tensor]:
    """Surface of revolution about +Y of a polyline profile of (r, y) points.

    The profile must run counter-clockwise in the (r, y) half plane (bottom centre -> outside -> top centre), so
    faces wind counter-clockwise seen from outside. Azimuth 0 lies on +Z, +90 deg on +X (``render/cameras.py``).
    Returns vertices [(m + 1) * n_seg, 3] float32, faces [2 m n_seg, 3] int64 (rings of r = 0 give zero-area
    triangles, which neither render nor bend vertex normals).
    """
    p = torch.tensor(profile, dtype=torch.float64)
    m = p.shape[0] - 1
    phi = torch.arange(n_seg, dtype=torch.float64) * (2 * math.pi / n_seg)
    r, y = p[:, 0:1], p[:, 1:2]
    v = torch.stack([r * torch.sin(phi), y.expand(-1, n_seg), r * torch.cos(phi)], -1).reshape(-1, 3)
    j, k = torch.meshgrid(torch.arange(m), torch.arange(n_seg), indexing="ij")
    a = j * n_seg + k
    b = j * n_seg + (k + 1) % n_seg
    c, d = a + n_seg, b + n_seg
    f = torch.cat([torch.stack([a, b, d], -1).reshape(-1, 3), torch.stack([a, d, c], -1).reshape(-1, 3)])
    return v.float(), f.long()


def _arc(cr: float, cy: float, rr: float, ry: float, a0: float, a1: float, n: int) -> List[Tuple[float, float]]:
    """Points of an elliptic arc centred (cr, cy) with radii (rr, ry) from angle a0 to a1 (radians), inclusive."""
    return [(cr + rr * math.cos(a0 + (a1 - a0) * i / n), cy + ry * math.sin(a0 + (a1 - a0) * i / n))
            for i in range(n + 1)]


def _merge(parts: Sequence[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
    vs, fs, off = [], [], 0
    for v, f in parts:
        vs.append(v)
        fs.append(f + off)
        off += v.shape[0]
    return torch.cat(vs), torch.cat(fs)


def _shift(mesh: Tuple[Tensor, Tensor], offset: Sequence[float]) -> Tuple[Tensor, Tensor]:
    return mesh[0] + torch.tensor(offset, dtype=torch.float32), mesh[1]


def _cube(h: float) -> Tuple[Tensor, Tensor]:
    """Cube of half side h with 4 own vertices per face, so vertex normals stay flat (sharp edges)."""
    vs, fs = [], []
    for axis in range(3):
        for sign in (-1.0, 1.0):
            n = torch.zeros(3)
            n[axis] = sign
            u = torch.zeros(3)
            u[(axis + 1) % 3] = 1.0
            w = torch.cross(n, u, dim=0)  # (u, w, n) right-handed: u x w = n, so (0, 1, 2) is CCW seen from n
            corners = [n * h + (su * u + sw * w) * h for su, sw in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
            base = len(vs) * 4
            vs.append(torch.stack(corners))
            fs.append(torch.tensor([[base, base + 1, base + 2], [base, base + 2, base + 3]]))
    return torch.cat(vs).float(), torch.cat(fs).long()


def _sphere(r: float, n_seg: int = 48, n_ring: int = 24) -> Tuple[Tensor, Tensor]:
    return _revolve(_arc(0.0, 0.0, r, r, -math.pi / 2, math.pi / 2, n_ring), n_seg)


def _cone_along_z(r: float, z0: float, z1: float, n_seg: int = 16) -> Tuple[Tensor, Tensor]:
    """A cone with its axis on +Z (base at z0, apex at z1), for the snowman's nose."""
    v, f = _revolve([(r, -0.0), (0.0, 1.0)], n_seg)  # unit-height cone about +Y, base ring at y=0
    y = v[:, 1] * (z1 - z0) + z0
    # (x, y, z) -> (x, -z, y): rotates +Y to +Z and keeps the winding (a proper rotation).
    return torch.stack([v[:, 0], -v[:, 2], y], -1), f


def shape_mesh(shape: str) -> Tuple[Tensor, Tensor]:
    """Triangle mesh of a world shape: vertices [N, 3] float32 (world units, centred), faces [F, 3] int64 (CCW out)."""
    n = 48
    if shape == "cube":
        return _cube(0.34)
    if shape == "sphere":
        return _sphere(0.45)
    if shape == "cone":
        h, r = 0.42, 0.40
        return _merge([_revolve([(0.0, -h), (r, -h)], n), _revolve([(r, -h), (0.0, h)], n)])
    if shape == "cylinder":
        h, r = 0.42, 0.32
        return _merge([_revolve([(0.0, -h), (r, -h)], n), _revolve([(r, -h), (r, h)], n),
                       _revolve([(r, h), (0.0, h)], n)])
    if shape == "torus":
        return _revolve(_arc(0.31, 0.0, 0.14, 0.14, -math.pi, math.pi, 24), n)
    if shape == "snowman":
        return _merge([_shift(_sphere(0.22), (0, -0.25, 0)), _shift(_sphere(0.16), (0, 0.07, 0)),
                       _shift(_sphere(0.11, 32, 16), (0, 0.31, 0)),
                       _shift(_cone_along_z(0.035, 0.09, 0.21), (0, 0.31, 0))])
    if shape == "mushroom":
        stem_r, cap_r = 0.12, 0.42
        return _merge([_revolve([(0.0, -0.42), (stem_r, -0.42)], 24), _revolve([(stem_r, -0.42), (stem_r, -0.02)], 24),
                       _revolve([(0.0, -0.02)] + _arc(0.0, -0.02, cap_r, 0.40, 0.0, math.pi / 2, 16), n)])
    raise DreamFlowError(f"toy world shape '{shape}' is unknown; use one of: {', '.join(SHAPES)}")


def part_masks(shape: str, points: Tensor) -> Tensor:
    """[P, 3] one-hot part of world points on the shape's surface: channel 0 main colour, 1 fixed second colour.

    Channel 2 stays 0. Single-part shapes are all channel 0; the snowman's nose and the mushroom's stem are
    channel 1 (decided by position, since a colour function sees only points).
    """
    out = torch.zeros_like(points)
    second = torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
    x, y, z = points.unbind(-1)
    if shape == "snowman":
        second = (z > 0.095) & (x.square() + (y - 0.31).square() < 0.037 ** 2)
    elif shape == "mushroom":
        second = (y < -0.021) & (x.square() + z.square() < 0.125 ** 2)
    out[:, 0] = (~second).to(points.dtype)
    out[:, 1] = second.to(points.dtype)
    return out


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
@dataclass
class WorldConfig:
    """How toy-world images are drawn (ours; cameras and lights follow the stages)."""

    resolution: int = 64
    """Image size, px (the prior's native resolution: 16 x 16 latents through the VAE's factor 4)."""
    camera: CameraConfig = None  # type: ignore[assignment]
    """Camera distribution; None = :data:`TOY_CAMERA` (the stages' defaults with elevations up to 80 degrees)."""
    albedo_prob: float = 0.3
    """Probability of an unshaded (ambient 1) image: stage 1 renders albedo only, so those are in-distribution."""
    ambient_range: Tuple[float, float] = (0.25, 0.6)
    """Ambient a of shaded images (diffuse = 1 - a); threestudio's 0.1 / 0.9 is darker than we want for colours."""
    light_background_prob: float = 0.5
    """Probability of a light background (each channel U(light_background_min, 1)); else U(0, 1)^3, the
    distribution of the NeRF background's random solid-colour augmentation (threestudio ``random_aug``)."""
    light_background_min: float = 0.6
    """Lower bound of each channel of a light background."""

    def __post_init__(self):
        if self.camera is None:
            self.camera = dataclasses.replace(TOY_CAMERA)


def render_geometry(shape: str, cameras: Cameras, lights: Tensor, backend: str = "auto") -> Dict[str, Tensor]:
    """Colour-independent renders of a shape (step 1 of the module docstring).

    Args:
        shape: one of ``SHAPES``.
        cameras: V cameras (their device is used).
        lights: [V, 3] point-light positions, world units.
        backend: rasterizer backend ("auto", "torch", "cuda").
    Returns:
        ``A`` [V, H, W, 2] anti-aliased part coverage, ``L`` [V, H, W, 2] Lambertian term per part,
        ``O`` [V, H, W, 1] opacity; float32 in [0, 1].
    """
    from ..render.mesh_render import render_mesh
    from ..render.shading import ShadingConfig

    dev = cameras.device
    v, f = shape_mesh(shape)
    v, f = v.to(dev), f.to(dev)
    color_fn: Callable[[Tensor], Tensor] = lambda p: part_masks(shape, p)
    flat = render_mesh(v, f, color_fn, cameras, background=None, shading="albedo", backend=backend)
    lit = render_mesh(v, f, color_fn, cameras, background=None, light_positions=lights.to(dev),
                      shading="lambertian", shading_config=ShadingConfig(ambient=0.0, diffuse=1.0), backend=backend)
    return {"A": flat["rgb"][..., :2].clamp(0, 1), "L": lit["rgb"][..., :2].clamp(0, 1),
            "O": flat["opacity"].clamp(0, 1)}


def compose(A: Tensor, L: Tensor, O: Tensor, colour: Tensor, secondary: Tensor, ambient: Tensor,
            background: Tensor) -> Tensor:
    """Images from :func:`render_geometry` outputs (step 2 of the module docstring).

    Args:
        A, L: [B, H, W, 2]; O: [B, H, W, 1] (any float dtype; uint8-scaled inputs must be divided by 255 first).
        colour, secondary: [B, 3] part colours in [0, 1]; ambient: [B] in [0, 1]; background: [B, 3].
    Returns:
        [B, H, W, 3] float32 in [0, 1].
    """
    a = ambient.float().view(-1, 1, 1, 1)
    shade = a * A.float() + (1 - a) * L.float()  # [B, H, W, 2]
    rgb = (shade[..., 0:1] * colour.float().view(-1, 1, 1, 3) + shade[..., 1:2] * secondary.float().view(-1, 1, 1, 3)
           + (1 - O.float()) * background.float().view(-1, 1, 1, 3))
    return rgb.clamp(0, 1)


def sample_appearance(n: int, cfg: WorldConfig, generator: torch.Generator) -> Dict[str, Tensor]:
    """Random ambient [n] and background [n, 3] (CPU, seeded) following ``cfg``."""
    lo, hi = cfg.ambient_range
    ambient = lo + (hi - lo) * torch.rand(n, generator=generator)
    ambient = torch.where(torch.rand(n, generator=generator) < cfg.albedo_prob, torch.ones_like(ambient), ambient)
    light_bg = cfg.light_background_min + (1 - cfg.light_background_min) * torch.rand(n, 3, generator=generator)
    any_bg = torch.rand(n, 3, generator=generator)
    use_light = (torch.rand(n, generator=generator) < cfg.light_background_prob).view(n, 1)
    return {"ambient": ambient, "background": torch.where(use_light, light_bg, any_bg)}


def colour_tensor(names: Sequence[str]) -> Tensor:
    """[len(names), 3] RGB of colour names."""
    return torch.tensor([COLOURS[c] for c in names], dtype=torch.float32)


def secondary_tensor(shapes: Sequence[str]) -> Tensor:
    """[len(shapes), 3] fixed second-part colours (zeros for single-part shapes)."""
    return torch.tensor([SECONDARY_COLOURS.get(s, (0.0, 0.0, 0.0)) for s in shapes], dtype=torch.float32)


def render_world(shape: str, colour: str, n_views: int, seed: int = 0, cfg: Optional[WorldConfig] = None,
                 device: str = "cpu", backend: str = "auto") -> Tuple[Tensor, List[str]]:
    """Images and captions of one (shape, colour) from the stages' random cameras (deterministic in ``seed``).

    Returns:
        images [n_views, H, W, 3] float32 in [0, 1] on ``device``; captions such as "a red cube, side view".
    """
    from ..render.shading import random_light

    if shape not in SHAPES or colour not in COLOURS:
        raise DreamFlowError(f"toy world has no '{colour} {shape}'; shapes: {', '.join(SHAPES)}; colours: "
                             f"{', '.join(COLOUR_NAMES)}")
    cfg = cfg or WorldConfig()
    gen = torch.Generator().manual_seed(int(seed))
    cams = sample_cameras(cfg.camera, n_views, cfg.resolution, generator=gen)
    lights = random_light(cams, gen)
    look = sample_appearance(n_views, cfg, gen)
    geo = render_geometry(shape, cams.to(device), lights.to(device), backend=backend)
    img = compose(geo["A"], geo["L"], geo["O"], colour_tensor([colour] * n_views).to(device),
                  secondary_tensor([shape] * n_views).to(device), look["ambient"].to(device),
                  look["background"].to(device))
    words = cams.view_words(cfg.camera)
    return img, [view_prompt(caption(shape, colour), w) for w in words]


def shape_trimesh(shape: str, colour: str):
    """A world shape as a ``trimesh.Trimesh`` with vertex colours (its parts' colours as the prior sees them): the
    example meshes of ``examples/`` (``toy_mushroom.glb``), loaded by DreamFlow Load Mesh."""
    import trimesh

    if colour not in COLOURS:
        raise DreamFlowError(f"toy world colour '{colour}' is unknown; use one of: {', '.join(COLOUR_NAMES)}")
    v, f = shape_mesh(shape)
    parts = part_masks(shape, v[f].mean(1))  # by face centre: a face is one part, as the renderer's masks say
    second = SECONDARY_COLOURS.get(shape, COLOURS[colour])
    rgb = parts[:, :1] * torch.tensor(COLOURS[colour]) + parts[:, 1:2] * torch.tensor(second)
    rgba = torch.cat([rgb, torch.ones(len(f), 1)], 1).repeat_interleave(3, 0)
    # three own vertices per face, so that vertex colours stay constant across it (Load Mesh welds them again)
    return trimesh.Trimesh(v[f].reshape(-1, 3).double().numpy(), torch.arange(3 * len(f)).reshape(-1, 3).numpy(),
                           vertex_colors=(rgba * 255).round().to(torch.uint8).numpy(), process=False)
