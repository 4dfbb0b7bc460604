"""Texture bake: evaluate a colour field on the surface, texel by texel, in UV space; pad the seams.

The mesh is rasterized with its UVs as clip-space positions, ``pos = (2u - 1, 2v - 1, 0, 1)``, so
each texel centre that falls inside a UV triangle gets the world point it maps to (barycentric
interpolation of the triangle's vertices). Row 0 of the rasterized image is NDC y = +1, i.e. v = 1:
the texture comes out row 0 = top, the layout PIL and glTF images use (see ``uv.py`` for the UV
convention). Texels outside every chart are then filled by iterative dilation, so bilinear and
mipmapped lookups near a chart border blend with copies of the border colour, not with background.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DreamFlowError, check
from ..render.raster import interpolate, rasterize
from .uv import MAX_TEXTURE_SIZE, check_mesh

ArrayLike = Union[np.ndarray, torch.Tensor]
ColorFn = Callable[[torch.Tensor], torch.Tensor]


def dilate_texture(texture: torch.Tensor, mask: torch.Tensor, iterations: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Grow the filled region by ``iterations`` texels (8-neighbourhood).

    Each pass sets every empty texel that touches a filled one to the mean of its filled 8-neighbours,
    so after k passes every texel within Chebyshev distance k of a chart holds a copy of nearby chart
    colours. Filled texels never change.

    Args:
        texture: [H, W, C] float. mask: [H, W] bool, True where the texel is filled.
        iterations: number of passes (texels of padding), >= 0.
    Returns:
        (texture, mask): new [H, W, C] texture and [H, W] bool mask of filled texels.
    """
    tex = texture.permute(2, 0, 1).clone()  # [C, H, W]
    m = mask[None].to(tex.dtype)  # [1, H, W]
    for _ in range(int(iterations)):
        count = _box3(m)
        grow = (count > 0) & (m == 0)
        if not bool(grow.any()):
            break
        total = _box3(tex * m)
        tex = torch.where(grow, total / count.clamp(min=1), tex)
        m = torch.where(grow, torch.ones_like(m), m)
    return tex.permute(1, 2, 0).contiguous(), m[0] > 0


def _box3(x: torch.Tensor) -> torch.Tensor:
    """Sum over each texel's 3 x 3 neighbourhood (zero outside), [C, H, W] -> [C, H, W]: separable shifted adds,
    less CPU time than the equivalent conv2d (bench/RESULTS.md, "Figures moved from docstrings"); the same sums up to
    float rounding."""
    p = F.pad(x, (1, 1, 1, 1))
    rows = p[:, :-2] + p[:, 1:-1] + p[:, 2:]
    return rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]


@torch.no_grad()
def bake_texture(vertices: ArrayLike, faces: ArrayLike, uvs: ArrayLike, color_fn: ColorFn, size: int = 1024,
                 padding: int = 8, backend: str = "auto", chunk: int = 1 << 18,
                 device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """Bake ``color_fn`` into an S x S texture over the UV atlas of a mesh.

    Args:
        vertices: [M, 3] float, world units (numpy or torch); e.g. ``uv_unwrap``'s ``vertices2``.
        faces: [F, 3] integer indices into ``vertices`` and ``uvs``.
        uvs: [M, 2] float in [0, 1], v up (``uv.py`` convention).
        color_fn: maps world points [N, 3] float32 (on ``device``) to colours [N, 3] in [0, 1]; called
            under ``torch.no_grad`` in chunks of at most ``chunk`` points, only at covered texels.
        size: texture size S, texels.
        padding: dilation passes, texels filled around each chart (see :func:`dilate_texture`).
        backend: rasterizer backend, "auto" | "torch" | "cuda".
        chunk: max points per ``color_fn`` call (bounds memory).
        device: where points are made; default: ``vertices``' device for a tensor, else CPU.
    Returns:
        texture: [S, S, 3] float32 CPU tensor in [0, 1], row 0 = top (v = 1). Texels beyond the padding
        hold the mean chart colour, so coarse mip levels do not darken towards the background.
    """
    v_np, f_np = check_mesh(vertices, faces, "bake_texture")
    if device is None:
        device = vertices.device if isinstance(vertices, torch.Tensor) else "cpu"
    return _bake_checked(v_np, f_np, uvs, color_fn, size, padding, backend, chunk, device)


def _bake_checked(v_np: np.ndarray, f_np: np.ndarray, uvs: ArrayLike, color_fn: ColorFn, size: int = 1024,
                  padding: int = 8, backend: str = "auto", chunk: int = 1 << 18, device="cpu") -> torch.Tensor:
    """:func:`bake_texture` on arrays that :func:`check_mesh` returned (``export_glb`` checks the mesh once)."""
    uv_np = uvs.detach().cpu().numpy() if isinstance(uvs, torch.Tensor) else np.asarray(uvs)
    check(uv_np.shape == (v_np.shape[0], 2), f"bake_texture: uvs must have shape [{v_np.shape[0]}, 2] (one per vertex), got {list(uv_np.shape)}")
    check(bool(np.isfinite(uv_np).all()) and uv_np.min() >= 0.0 and uv_np.max() <= 1.0,
          f"bake_texture: uvs must be finite and in [0, 1], got range {np.nanmin(uv_np):.3g}..{np.nanmax(uv_np):.3g}; run uv_unwrap")
    check(16 <= int(size) <= MAX_TEXTURE_SIZE, f"bake_texture: size {size} must be in 16..{MAX_TEXTURE_SIZE} texels")
    check(int(padding) >= 0, f"bake_texture: padding {padding} must be >= 0 texels")
    check(int(chunk) > 0, f"bake_texture: chunk {chunk} must be > 0")
    S = int(size)

    v_t = torch.from_numpy(v_np).to(device)
    f_t = torch.from_numpy(f_np).to(device)
    uv_t = torch.from_numpy(np.ascontiguousarray(uv_np, dtype=np.float32)).to(device)
    # UVs as clip-space positions; z = 0 for all, so overlapping triangles (which xatlas never makes)
    # would tie and the lower index win. Row 0 of rast is NDC y = +1, i.e. v = 1: the top of the image.
    pos_clip = torch.cat([uv_t * 2.0 - 1.0, torch.zeros_like(uv_t[:, :1]), torch.ones_like(uv_t[:, :1])], dim=-1)
    rast = rasterize(pos_clip, f_t, (S, S), backend=backend)  # [1, S, S, 4]
    covered = rast[0, ..., 3] > 0
    points = interpolate(v_t, rast, f_t, backend=backend)[0][covered]  # [P, 3] world points of covered texels

    texture = torch.zeros(S, S, 3, dtype=torch.float32, device=device)
    if points.shape[0] == 0:
        raise DreamFlowError(f"bake_texture: no texel of the {S}x{S} texture is covered by a UV triangle; "
                             f"the UVs are degenerate, run uv_unwrap on the mesh first")
    colors = []
    for s in range(0, points.shape[0], int(chunk)):
        c = color_fn(points[s:s + int(chunk)])
        if not isinstance(c, torch.Tensor) or tuple(c.shape) != (min(int(chunk), points.shape[0] - s), 3):
            raise DreamFlowError(f"bake_texture: color_fn must return a [N, 3] tensor for [N, 3] points, got "
                                 f"{type(c).__name__} {list(getattr(c, 'shape', []))}; return RGB albedo in [0, 1]")
        colors.append(c.detach().float().to(device))
    colors = torch.cat(colors)
    bad = int((~torch.isfinite(colors)).any(-1).sum())
    if bad:
        raise DreamFlowError(f"bake_texture: color_fn returned NaN/inf at {bad} of {len(colors)} surface points; the colour field diverged")
    texture[covered] = colors.clamp(0.0, 1.0)

    texture, filled = dilate_texture(texture, covered, int(padding))
    texture[~filled] = texture[covered].mean(0)
    return texture.cpu()


def sample_texture(texture: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear texture lookup as a GPU samples it (no mipmaps): texel centres at ``(j + 0.5) / W``, clamp to edge.

    Args:
        texture: [H, W, C] float, row 0 = top (v = 1).
        uv: [P, 2] float, v up (``uv.py`` convention); on texture's device.
    Returns:
        [P, C] texture values, texture's dtype.
    """
    grid = torch.stack([uv[:, 0] * 2 - 1, (1 - uv[:, 1]) * 2 - 1], dim=-1)  # grid_sample: y = -1 is row 0
    img = texture.permute(2, 0, 1)[None]
    out = F.grid_sample(img, grid.to(img.dtype)[None, None], mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, :, 0].t()
