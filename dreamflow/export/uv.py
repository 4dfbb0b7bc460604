"""UV atlas: cut a mesh into charts and pack them into one square texture with xatlas.

UV convention (used by every module of ``dreamflow.export``): ``uvs[:, 0] = u`` grows to the right,
``uvs[:, 1] = v`` grows **up**, (0, 0) is the bottom-left corner of the texture image. This is the
OpenGL / OBJ convention that trimesh's ``TextureVisuals`` uses; trimesh writes ``1 - v`` into the
glTF ``TEXCOORD_0`` accessor (whose origin is the top-left), so a texture image stored row 0 = top
(PIL, ComfyUI) lines up. Texel ``(row i, column j)`` of an S x S texture has its centre at
``u = (j + 0.5) / S``, ``v = 1 - (i + 0.5) / S``.
"""

from __future__ import annotations

import math
from typing import Tuple, Union

import numpy as np
import torch

from ..errors import DreamFlowError, check

ArrayLike = Union[np.ndarray, torch.Tensor]

#: Largest texture side accepted, texels: an 8192^2 float32 RGB bake already takes 0.8 GB (choice).
MAX_TEXTURE_SIZE = 8192

#: Fraction of the atlas that xatlas charts typically fill (its ``utilization`` on spheres, cubes and
#: marching-cubes meshes: 0.58-0.97, measured). Used to pick texels per world unit so the packed atlas
#: comes out close to the requested resolution.
_EXPECTED_UTILIZATION = 0.6


def _as_numpy(x: ArrayLike, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x), dtype=dtype)


def check_mesh(vertices: ArrayLike, faces: ArrayLike, where: str = "mesh") -> Tuple[np.ndarray, np.ndarray]:
    """Validate a triangle mesh given by the user's pipeline; return float32 [N, 3] and int64 [F, 3] arrays.

    Raises DreamFlowError (one line) for wrong shapes, no faces, non-finite vertices or indices out of range.
    """
    v = _as_numpy(vertices, np.float32)
    f_any = faces.detach().cpu().numpy() if isinstance(faces, torch.Tensor) else np.asarray(faces)
    check(f_any.dtype.kind in "iu", f"{where}: faces must be integer vertex indices, got dtype {f_any.dtype}")
    f_raw = np.ascontiguousarray(f_any, dtype=np.int64)
    check(v.ndim == 2 and v.shape[1] == 3, f"{where}: vertices must have shape [N, 3], got {list(v.shape)}")
    check(f_raw.ndim == 2 and f_raw.shape[1] == 3, f"{where}: faces must have shape [F, 3] (triangles), got {list(f_raw.shape)}")
    check(f_raw.shape[0] > 0 and v.shape[0] > 0,
          f"{where}: the mesh is empty ({v.shape[0]} vertices, {f_raw.shape[0]} faces); extract a mesh with a lower threshold")
    check(bool(np.isfinite(v).all()), f"{where}: {int((~np.isfinite(v)).any(1).sum())} vertices are NaN/inf; the geometry stage diverged")
    lo, hi = int(f_raw.min()), int(f_raw.max())
    check(lo >= 0 and hi < v.shape[0], f"{where}: face indices span {lo}..{hi} but there are {v.shape[0]} vertices")
    return v, f_raw


def uv_unwrap(vertices: ArrayLike, faces: ArrayLike, resolution: int = 1024, chart_padding: int = 4,
              return_vmapping: bool = False):
    """Cut the mesh into charts and pack them into the unit square (xatlas); deterministic.

    Vertices on a seam between charts are duplicated (one copy per chart), so the output has M >= N
    vertices; faces keep their order and winding: ``vmapping[faces2] == faces``.

    Args:
        vertices: [N, 3] float (numpy or torch, any device), world units.
        faces: [F, 3] integer vertex indices (counter-clockwise seen from outside, as glTF expects).
        resolution: texture size S in texels the atlas is packed for; sets the charts' texel density.
        chart_padding: empty texels xatlas leaves between charts (``PackOptions.padding``) at ``resolution``.
        return_vmapping: also return ``vmapping`` [M] int64, the source vertex of each output vertex.

    Returns:
        vertices2: [M, 3] float32 numpy, ``vertices[vmapping]``.
        faces2: [F, 3] int64 numpy, indices into ``vertices2``.
        uvs: [M, 2] float32 numpy in [0, 1] (v up, see the module docstring).
        vmapping: [M] int64 numpy (only with ``return_vmapping``).
    """
    v, f = check_mesh(vertices, faces, "uv_unwrap")
    return _unwrap_checked(v, f, resolution, chart_padding, return_vmapping)


def _unwrap_checked(v: np.ndarray, f: np.ndarray, resolution: int = 1024, chart_padding: int = 4,
                    return_vmapping: bool = False):
    """:func:`uv_unwrap` on arrays that :func:`check_mesh` returned (``export_glb`` checks the mesh once)."""
    import xatlas  # imported here: keeps ComfyUI start-up fast (xatlas is only needed on export)

    check(16 <= int(resolution) <= MAX_TEXTURE_SIZE, f"uv_unwrap: resolution {resolution} must be in 16..{MAX_TEXTURE_SIZE} texels")
    check(0 <= int(chart_padding) < int(resolution) // 4, f"uv_unwrap: chart_padding {chart_padding} must be in 0..{int(resolution) // 4 - 1} texels")

    tri = v[f]
    area = float(0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1).sum())
    check(area > 0, "uv_unwrap: every face has zero area; the mesh is degenerate")

    atlas = xatlas.Atlas()
    atlas.add_mesh(v, f.astype(np.uint32))
    pack = xatlas.PackOptions()
    pack.padding = int(chart_padding)
    # A fixed texel density with ``resolution = 0`` always gives ONE atlas (xatlas' own ``resolution``
    # mode may spill charts into a second atlas whose UVs would overlap the first). The density is chosen
    # so that area * density^2 / utilization ~= resolution^2, i.e. the atlas comes out ~resolution wide.
    pack.texels_per_unit = float(resolution) * math.sqrt(_EXPECTED_UTILIZATION / area)
    atlas.generate(pack_options=pack)
    if atlas.atlas_count != 1:  # cannot happen with resolution = 0; guards a future xatlas change
        raise DreamFlowError(f"uv_unwrap: xatlas packed {atlas.atlas_count} atlases, expected 1; report this with the mesh size ({len(v)} vertices)")
    vmapping, faces2, uvs = atlas[0]
    # xatlas normalises by its atlas width and height (~resolution, not exactly): the UVs fill [0, 1]^2
    # and the charts are stretched by at most a few percent in one direction, harmless for baking.
    vmapping = vmapping.astype(np.int64)
    faces2 = faces2.astype(np.int64).reshape(-1, 3)
    uvs = np.clip(uvs.astype(np.float32), 0.0, 1.0)
    vertices2 = v[vmapping]
    if return_vmapping:
        return vertices2, faces2, uvs, vmapping
    return vertices2, faces2, uvs
