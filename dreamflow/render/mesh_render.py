"""Render a triangle mesh with a colour field: rasterize, interpolate, colour covered pixels, shade,
composite over a background, anti-alias; and turntable previews.

Pipeline of :func:`render_mesh` (nvdiffrast style, as threestudio's mesh renderer):

1. ``pos_clip = [x, 1] @ mvp^T`` per camera (``Cameras.mvp``, OpenGL clip space);
2. ``rast = rasterize(pos_clip, faces)``; world points and smooth (area-weighted vertex) normals are
   interpolated per pixel;
3. the colour field is evaluated **only at covered pixels**, then shaded (``render/shading.py``);
4. composited over the background, and rgb + opacity anti-aliased together, which makes silhouettes
   (and so coverage) differentiable in the vertex positions.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DreamFlowError
from ..scene.mesh import vertex_normals
from .cameras import Cameras, orbit_cameras
from .raster import antialias, antialias_topology, interpolate, rasterize
from .shading import SHADING_MODES, ShadingConfig, light_directions, shade

ColorFn = Callable[[Tensor], Tensor]
BackgroundLike = Union[None, float, Sequence[float], Tensor, Callable[[Tensor], Tensor]]


def clip_positions(vertices: Tensor, cameras: Cameras, near: float = 0.1, far: float = 100.0) -> Tensor:
    """[V, N, 4] clip-space positions of world vertices [N, 3] for each camera (``mvp @ [x, 1]``)."""
    hom = torch.cat([vertices, torch.ones_like(vertices[:, :1])], dim=1)
    mvp = cameras.mvp(near, far).to(device=vertices.device, dtype=vertices.dtype)
    return torch.einsum("vij,nj->vni", mvp, hom)


def _background(background: BackgroundLike, cameras: Cameras, like: Tensor) -> Tensor:
    """Background colours [V, H, W, 3] for the forms :func:`render_mesh` accepts."""
    V, H, W = len(cameras), cameras.height, cameras.width
    if background is None:
        return like.new_zeros(V, H, W, 3)
    if callable(background) and not torch.is_tensor(background):
        _, dirs = cameras.to(like.device).rays()
        out = background(dirs.to(like.dtype))
        if not torch.is_tensor(out) or tuple(out.shape) != (V, H, W, 3):
            raise DreamFlowError(f"render_mesh: background module returned {tuple(getattr(out, 'shape', ()))}; "
                                 f"expected [V, H, W, 3] = {(V, H, W, 3)} for view directions [V, H, W, 3]")
        return out.to(like.dtype)
    c = torch.as_tensor(background, dtype=like.dtype, device=like.device)
    if c.dim() <= 1 and c.numel() in (1, 3):
        return c.reshape(-1).expand(3).expand(V, H, W, 3) if c.numel() == 1 else c.expand(V, H, W, 3)
    if tuple(c.shape) in ((V, H, W, 3), (1, H, W, 3), (V, 1, 1, 3)):
        return c.expand(V, H, W, 3)
    raise DreamFlowError(f"render_mesh: background of shape {tuple(c.shape)} is not a grey level, (r, g, b), "
                         f"[V, H, W, 3] image or a module of view directions")


def render_mesh(vertices: Tensor, faces: Tensor, color_fn: ColorFn, cameras: Cameras,
                background: BackgroundLike = None, light_positions: Optional[Tensor] = None, shading: str = "auto",
                shading_config: Optional[ShadingConfig] = None, backend: str = "auto", near: float = 0.1,
                far: float = 100.0, anti_alias: bool = True, topology=None,
                normals: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """Render a mesh from a batch of cameras.

    Args:
        vertices: [N, 3] float world positions (differentiable).
        faces: [F, 3] int vertex indices, counter-clockwise seen from outside.
        color_fn: albedo of world points [P, 3] -> [P, 3] in [0, 1] (e.g. ``MeshModel.albedo``); called
            once, on the covered pixels of all views only.
        cameras: V cameras (``render/cameras.py``); the image size is theirs.
        background: None (black, i.e. rgb premultiplied by opacity), a grey level, an (r, g, b), a
            [V, H, W, 3] image, or a module of unit view directions [V, H, W, 3] -> [V, H, W, 3]
            (``scene.nerf.Background``).
        light_positions: point-light positions [V, 3] or [3], world units (``shading.random_light``); needed
            by the "lambertian" and "textureless" modes.
        shading: a ``shading.SHADING_MODES`` entry, or "auto": "lambertian" with a light, else "albedo".
        shading_config: its ``ambient`` / ``diffuse`` are k_a, k_d of ``shading.shade`` (default
            ``ShadingConfig()``: threestudio 0.1 / 0.9).
        backend: rasterizer backend, "auto" | "cuda" | "torch".
        near, far: clip planes, world units along the view axis.
        anti_alias: anti-alias rgb and opacity (silhouette gradients); off gives hard point-sampled edges.
        topology: optional ``raster.antialias_topology(faces, backend)`` precomputed for fixed faces.
        normals: optional [N, 3] unit vertex normals of ``vertices`` (``scene.mesh.vertex_normals``, e.g.
            ``MeshModel.deform().vertex_normals``) when the caller has them already; computed here otherwise.
    Returns:
        dict of float tensors on vertices' device, row 0 at the top:
        ``rgb`` [V, H, W, 3] composited colour; ``opacity`` [V, H, W, 1] in [0, 1] (anti-aliased coverage);
        ``depth`` [V, H, W, 1] distance along the view axis, world units, 0 where empty; ``normal``
        [V, H, W, 3] unit world normals (interpolated vertex normals), 0 where empty; ``rast`` [V, H, W, 4]
        the rasterizer output.
    """
    light = light_positions
    if shading == "auto":
        shading = "albedo" if light is None else "lambertian"
    if shading not in SHADING_MODES:
        raise DreamFlowError(f"render_mesh: shading '{shading}' is unknown; use one of: auto, {', '.join(SHADING_MODES)}")
    if shading != "albedo" and light is None:
        raise DreamFlowError(f"render_mesh: shading '{shading}' needs light positions; pass light_positions= "
                             f"(e.g. shading.random_light(cameras)) or use shading='albedo'")
    if not torch.is_tensor(vertices) or vertices.dim() != 2 or vertices.shape[1] != 3:
        raise DreamFlowError(f"render_mesh: vertices have shape {tuple(getattr(vertices, 'shape', ()))}; expected [N, 3]")
    sc = shading_config or ShadingConfig()
    V, H, W = len(cameras), cameras.height, cameras.width

    # 1-2. Rasterize; interpolate world points, normals and view depth (clip w = -z_camera).
    pos_clip = clip_positions(vertices, cameras, near, far)
    rast = rasterize(pos_clip, faces, (H, W), backend=backend)
    covered = rast[..., 3] > 0  # [V, H, W]
    if normals is None:
        normals = vertex_normals(vertices, faces)
    elif tuple(normals.shape) != tuple(vertices.shape):
        raise DreamFlowError(f"render_mesh: normals have shape {tuple(normals.shape)}, expected one per vertex "
                             f"{tuple(vertices.shape)}; pass vertex_normals(vertices, faces) or normals=None")
    attrs = torch.cat([vertices, normals.to(vertices.dtype)], dim=1)
    xyz_n = interpolate(attrs, rast, faces, backend=backend)
    depth = interpolate(pos_clip[..., 3:4].contiguous(), rast, faces, backend=backend)
    normal = F.normalize(xyz_n[..., 3:], dim=-1) * covered.unsqueeze(-1)

    # 3. Colour only where a surface is seen. The covered pixels are listed once (the one host sync of
    # the render: their count sizes the colour query); gathers and the scatter below reuse the list.
    pix = covered.reshape(-1).nonzero().squeeze(1)  # [P] flat indices v * H * W + row * W + col
    points = xyz_n[..., :3].reshape(V * H * W, 3).index_select(0, pix)  # [P, 3]
    albedo = color_fn(points)
    if not torch.is_tensor(albedo) or tuple(albedo.shape) != (points.shape[0], 3):
        raise DreamFlowError(f"render_mesh: color_fn returned {tuple(getattr(albedo, 'shape', ()))} for "
                             f"{points.shape[0]} points; expected [P, 3]")
    if shading == "albedo":
        color = albedo
    else:
        light = torch.as_tensor(light, dtype=points.dtype, device=points.device).reshape(-1, 3).expand(V, 3)
        view = torch.div(pix, H * W, rounding_mode="floor")
        color = shade(albedo, normal.reshape(V * H * W, 3).index_select(0, pix),
                      light_directions(light[view], points), ambient=sc.ambient, diffuse=sc.diffuse, mode=shading)
    fg = points.new_zeros(V * H * W, 3).index_put((pix,), color.to(points.dtype)).view(V, H, W, 3)

    # 4. Composite, then anti-alias colour and coverage together.
    opacity = covered.unsqueeze(-1).to(fg.dtype)
    rgb = fg + (1 - opacity) * _background(background, cameras, fg)
    if anti_alias:
        out = antialias(torch.cat([rgb, opacity], dim=-1), rast, pos_clip, faces, backend=backend, topology=topology)
        rgb, opacity = out[..., :3], out[..., 3:]
    return {"rgb": rgb, "opacity": opacity, "depth": depth, "normal": normal, "rast": rast}


@torch.no_grad()
def render_turntable(vertices: Tensor, faces: Tensor, color_fn: ColorFn, n_views: int = 8, resolution: int = 256,
                     elevation: float = 15.0, background: BackgroundLike = (1.0, 1.0, 1.0), fovy: float = 45.0,
                     distance: float = 1.25, shading: str = "albedo", ambient: float = 0.3, diffuse: float = 0.7,
                     views_per_batch: int = 4, backend: str = "auto") -> Tensor:
    """Evenly spaced views around the object, starting at the front (for previews and videos).

    Args:
        vertices, faces, color_fn: as in :func:`render_mesh`.
        n_views: number of views, azimuth step 360 / n_views degrees.
        resolution: square image size, pixels.
        elevation: camera elevation, degrees.
        background: as in :func:`render_mesh` (white by default).
        fovy, distance: ``orbit_cameras`` arguments (distance relative to the field of view).
        shading: "albedo" (unlit, as a viewer shows the exported GLB), "lambertian" (a light at each
            camera: shows shape) or "textureless" (shape only).
        ambient, diffuse: k_a, k_d for the lit modes; brighter ambient than training so dark sides stay readable.
        views_per_batch: views rendered together (memory bound).
    Returns:
        [n_views, resolution, resolution, 3] float32 CPU images in [0, 1], row 0 at the top.
    """
    if n_views < 1 or resolution < 1 or views_per_batch < 1:
        raise DreamFlowError(f"render_turntable: n_views={n_views}, resolution={resolution}, "
                             f"views_per_batch={views_per_batch} must all be >= 1")
    cams = orbit_cameras(n_views, resolution, elevation=elevation, fovy=fovy, distance=distance).to(vertices.device)
    topology = antialias_topology(faces.to(vertices.device), backend)
    images = []
    for s in range(0, n_views, views_per_batch):
        sl = slice(s, min(s + views_per_batch, n_views))
        sub = cams.subset(sl)
        light = sub.position if shading != "albedo" else None
        out = render_mesh(vertices, faces, color_fn, sub, background=background, light_positions=light,
                          shading=shading, shading_config=ShadingConfig(ambient=ambient, diffuse=diffuse),
                          backend=backend, topology=topology)
        images.append(out["rgb"].float().clamp(0, 1).cpu())
    return torch.cat(images)
