"""GLB writer: a textured PBR mesh (glTF 2.0 binary), written atomically.

World axes need no conversion: DreamFlow is +Y up with the object's front facing +Z, which is glTF's
convention. Faces are counter-clockwise seen from outside (glTF front faces). The base colour is an
8-bit PNG embedded in the file; UVs follow ``uv.py`` (v up; trimesh writes ``1 - v`` for glTF).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np
import torch

from ..errors import check
from ..io import atomic_path
from ..render.cameras import Cameras, orbit_cameras
from ..render.mesh_render import clip_positions
from ..render.raster import antialias, antialias_topology, interpolate, rasterize
from ..scene.mesh import vertex_normals, weld_positions
from .bake import _bake_checked, sample_texture
from .uv import MAX_TEXTURE_SIZE, _unwrap_checked, check_mesh

ArrayLike = Union[np.ndarray, torch.Tensor]


@dataclass
class ExportConfig:
    """How a mesh and its colour field become a textured GLB."""

    texture_size: int = 1024
    """Base-colour texture width = height, texels (threestudio ``mesh-exporter`` ``texture_size`` default 1024)."""
    padding: int = 8
    """Texels filled around each UV chart by dilation, so bilinear/mipmapped lookups do not bleed background
    into seams. threestudio inpaints 2 px (cv2 Telea, radius = xatlas padding); 8 keeps mip level 3 clean (choice)."""
    chart_padding: int = 4
    """Empty texels between UV charts at ``texture_size`` (xatlas ``PackOptions.padding``; xatlas default 0,
    threestudio 2). Wider gaps let each chart's dilation grow without meeting its neighbour's."""
    metallic: float = 0.0
    """glTF ``metallicFactor`` in [0, 1]; 0: the baked albedo is a dielectric's diffuse colour (glTF default is 1)."""
    roughness: float = 0.9
    """glTF ``roughnessFactor`` in [0, 1]; 0.9: nearly matte, as the albedo was optimised under diffuse shading
    (choice; glTF default 1.0)."""
    double_sided: bool = False
    """glTF ``doubleSided``: render back faces too (needed only for open or inverted meshes)."""
    turntable: int = 0
    """Views of a turntable of the exported, textured mesh (rendered from the UVs and baked texture, as a
    viewer would show it) that ``export_glb`` writes beside the GLB as ``<name>_turntable.png``, one row of
    views from the front, azimuth step 360 / n degrees (0: none)."""
    turntable_resolution: int = 256
    """Side of each turntable view, pixels."""
    backend: str = "auto"
    """Rasterizer for the bake and the turntable: "auto" (nvdiffrast if usable, else torch), "torch" or "cuda"."""
    unwrap_worker: bool = True
    """Run the UV unwrap (xatlas, most of an export's time) in a child process: xatlas holds the interpreter lock
    throughout, which froze a hosting ComfyUI server (HTTP, websocket, Cancel) for the whole unwrap (measured:
    bench/RESULTS.md); in a child the server keeps answering and Cancel terminates it. False: in this process (no child start-up)."""

    def validate(self) -> "ExportConfig":
        from ..config import check_finite

        check_finite(self, "export")
        check(16 <= int(self.texture_size) <= MAX_TEXTURE_SIZE,
              f"export texture_size {self.texture_size} must be in 16..{MAX_TEXTURE_SIZE} texels (1024 is typical)")
        check(0 <= int(self.padding) <= int(self.texture_size) // 4, f"export padding {self.padding} must be in 0..{int(self.texture_size) // 4} texels")
        check(0 <= int(self.chart_padding) < int(self.texture_size) // 4,
              f"export chart_padding {self.chart_padding} must be in 0..{int(self.texture_size) // 4 - 1} texels")
        check(0.0 <= float(self.metallic) <= 1.0, f"export metallic {self.metallic} must be in [0, 1]")
        check(0.0 <= float(self.roughness) <= 1.0, f"export roughness {self.roughness} must be in [0, 1]")
        check(0 <= int(self.turntable) <= 360, f"export turntable {self.turntable} must be in 0..360 views")
        check(16 <= int(self.turntable_resolution) <= 4096,
              f"export turntable_resolution {self.turntable_resolution} must be in 16..4096 pixels")
        check(self.backend in ("auto", "torch", "cuda"), f"export backend '{self.backend}' is unknown; use one of: auto, torch, cuda")
        return self


def _unit_vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """[N, 3] float32 unit area-weighted vertex normals (``scene.mesh.vertex_normals``); +Y for a vertex
    touching only zero-area faces, since glTF requires unit NORMALs (the validator errs on others)."""
    n = vertex_normals(torch.from_numpy(vertices).double(), torch.from_numpy(faces))
    unit = n.norm(dim=-1, keepdim=True) > 0.5
    return torch.where(unit, n, torch.tensor([0.0, 1.0, 0.0], dtype=n.dtype)).float().numpy()


def _set_view_targets(tree: dict) -> None:
    """Mark vertex / index buffer views with their GL target (trimesh leaves ``target`` unset; the glTF
    validator then hints BUFFER_VIEW_TARGET_MISSING, and some loaders guess the binding)."""
    views = tree.get("bufferViews", [])
    for mesh in tree.get("meshes", []):
        for prim in mesh.get("primitives", []):
            for acc in prim.get("attributes", {}).values():
                views[tree["accessors"][acc]["bufferView"]]["target"] = 34962  # ARRAY_BUFFER
            if "indices" in prim:
                views[tree["accessors"][prim["indices"]]["bufferView"]]["target"] = 34963  # ELEMENT_ARRAY_BUFFER


def _write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` (the temporary file of :func:`dreamflow.io.atomic_path`)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_glb(path: str, vertices: ArrayLike, faces: ArrayLike, uvs: ArrayLike, texture: ArrayLike,
              normals: Optional[ArrayLike] = None, metallic: float = 0.0, roughness: float = 0.9,
              double_sided: bool = False, name: str = "dreamflow") -> str:
    """Write a textured mesh as a GLB; the file appears under ``path`` only once complete.

    Args:
        path: destination ``.glb`` file; its folder is created.
        vertices: [M, 3] float, world units (+Y up, front +Z).
        faces: [F, 3] integer, counter-clockwise seen from outside.
        uvs: [M, 2] float in [0, 1], v up (``uv.py`` convention).
        texture: [S, S, 3] or [H, W, 3] float in [0, 1] (clamped), row 0 = top; stored as 8-bit PNG.
        normals: optional [M, 3] float vertex normals (normalised here); written as NORMAL when given.
        metallic, roughness: glTF ``metallicFactor`` / ``roughnessFactor`` in [0, 1].
        double_sided: glTF ``doubleSided``.
        name: mesh and material name in the file.
    Returns:
        ``path``.
    """
    v, f = check_mesh(vertices, faces, "write_glb")
    return _write_glb_checked(path, v, f, uvs, texture, normals, metallic, roughness, double_sided, name)


def _write_glb_checked(path: str, v: np.ndarray, f: np.ndarray, uvs: ArrayLike, texture: ArrayLike,
                       normals: Optional[ArrayLike] = None, metallic: float = 0.0, roughness: float = 0.9,
                       double_sided: bool = False, name: str = "dreamflow") -> str:
    """:func:`write_glb` on arrays that :func:`check_mesh` returned (``export_glb`` checks the mesh once)."""
    import trimesh  # imported here: keeps ComfyUI start-up fast (trimesh is only needed on export)
    from PIL import Image

    uv = uvs.detach().cpu().numpy() if isinstance(uvs, torch.Tensor) else np.asarray(uvs)
    check(uv.shape == (v.shape[0], 2), f"write_glb: uvs must have shape [{v.shape[0]}, 2], got {list(uv.shape)}")
    check(bool(np.isfinite(uv).all()), "write_glb: uvs contain NaN/inf; run uv_unwrap")
    tex = texture.detach().cpu().float().numpy() if isinstance(texture, torch.Tensor) else np.asarray(texture, dtype=np.float32)
    check(tex.ndim == 3 and tex.shape[2] == 3 and min(tex.shape[:2]) >= 1,
          f"write_glb: texture must have shape [H, W, 3], got {list(tex.shape)}")
    check(bool(np.isfinite(tex).all()), "write_glb: texture contains NaN/inf; the bake failed")
    check(0.0 <= float(metallic) <= 1.0 and 0.0 <= float(roughness) <= 1.0,
          f"write_glb: metallic {metallic} and roughness {roughness} must be in [0, 1]")
    n = None
    if normals is not None:
        n = normals.detach().cpu().numpy() if isinstance(normals, torch.Tensor) else np.asarray(normals)
        check(n.shape == v.shape, f"write_glb: normals must have shape {list(v.shape)}, got {list(n.shape)}")
        length = np.linalg.norm(n, axis=1, keepdims=True)
        check(bool(np.isfinite(n).all()) and bool((length > 1e-12).all()), "write_glb: normals contain NaN/inf or zero vectors")
        n = (n / length).astype(np.float32)

    image = Image.fromarray(np.round(np.clip(tex, 0.0, 1.0) * 255.0).astype(np.uint8), mode="RGB")
    material = trimesh.visual.material.PBRMaterial(
        name=name, baseColorTexture=image, metallicFactor=float(metallic), roughnessFactor=float(roughness),
        doubleSided=bool(double_sided))
    # process=False keeps the seam duplicates xatlas made (merging them would tear the UVs)
    mesh = trimesh.Trimesh(vertices=v, faces=f, vertex_normals=n, process=False,
                           visual=trimesh.visual.TextureVisuals(uv=uv.astype(np.float64), material=material))
    scene = trimesh.Scene()
    scene.add_geometry(mesh, geom_name=name, node_name=name)
    data = trimesh.exchange.gltf.export_glb(scene, include_normals=n is not None, tree_postprocessor=_set_view_targets)
    with atomic_path(path) as tmp:
        _write_bytes(tmp, data)
    return path


def _float_tensor(x: ArrayLike, device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device=device, dtype=torch.float32)
    return torch.as_tensor(np.asarray(x), dtype=torch.float32, device=device)


@torch.no_grad()
def render_textured_turntable(vertices: ArrayLike, faces: ArrayLike, uvs: ArrayLike, texture: ArrayLike,
                              n_views: int = 8, resolution: int = 256, elevation: float = 15.0,
                              background=(1.0, 1.0, 1.0), views_per_batch: int = 4, backend: str = "auto",
                              device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """Render a UV-textured mesh around a turntable, unlit (the base colour as a viewer shows it).

    Same cameras as ``render.mesh_render.render_turntable`` (``orbit_cameras``: front first, fovy 45 deg),
    but colours come from bilinear lookups of ``texture`` at the interpolated UVs, i.e. from what the GLB
    holds, not from the colour field.

    Args:
        vertices [M, 3], faces [F, 3], uvs [M, 2] (v up), texture [H, W, 3] in [0, 1] (row 0 = top): as for
            :func:`write_glb`; numpy or torch.
        n_views: views, azimuth step 360 / n_views degrees. resolution: square view side, pixels.
        elevation: camera elevation, degrees. background: (r, g, b) in [0, 1].
        views_per_batch: views rasterized together (memory bound). backend: rasterizer backend.
        device: where to render; default: ``vertices``' device for a tensor, else CPU.
    Returns:
        [n_views, resolution, resolution, 3] float32 CPU images in [0, 1], row 0 at the top.
    """
    check(n_views >= 1 and resolution >= 1 and views_per_batch >= 1,
          f"render_textured_turntable: n_views={n_views}, resolution={resolution}, views_per_batch={views_per_batch} must be >= 1")
    if device is None:
        device = vertices.device if isinstance(vertices, torch.Tensor) else "cpu"
    v_np, f_np = check_mesh(vertices, faces, "render_textured_turntable")
    return _turntable_checked(v_np, f_np, uvs, texture, n_views, resolution, elevation, background, views_per_batch,
                              backend, device)


def _turntable_checked(v_np: np.ndarray, f_np: np.ndarray, uvs: ArrayLike, texture: ArrayLike, n_views: int = 8,
                       resolution: int = 256, elevation: float = 15.0, background=(1.0, 1.0, 1.0),
                       views_per_batch: int = 4, backend: str = "auto", device="cpu") -> torch.Tensor:
    """:func:`render_textured_turntable` on arrays that :func:`check_mesh` returned (``export_glb`` checks
    the mesh once)."""
    f = torch.from_numpy(f_np).to(device)
    uv = _float_tensor(uvs, device)
    check(tuple(uv.shape) == (v_np.shape[0], 2), f"render_textured_turntable: uvs must have shape [{v_np.shape[0]}, 2], got {list(uv.shape)}")
    tex = _float_tensor(texture, device)
    check(tex.dim() == 3 and tex.shape[2] == 3, f"render_textured_turntable: texture must have shape [H, W, 3], got {list(tex.shape)}")
    bg = torch.as_tensor(background, dtype=torch.float32, device=device).reshape(-1).expand(3)
    # Seam vertices are duplicated per chart; to the anti-aliasing, a seam would look like an open boundary
    # (a silhouette) and get blended with its neighbours. Welding equal positions restores the surface's
    # adjacency; faces keep their order, so the rasterizer's triangle ids index both face lists.
    v_weld, f_weld = weld_positions(v_np, f_np)
    v_weld, f_weld = torch.from_numpy(v_weld).to(device), torch.from_numpy(f_weld).to(device)
    cams = orbit_cameras(n_views, resolution, elevation=elevation).to(device)
    topology = antialias_topology(f_weld, backend)
    images = []
    for s in range(0, n_views, views_per_batch):
        sl = slice(s, min(s + views_per_batch, n_views))
        sub = Cameras(cams.c2w[sl], cams.fovy[sl], cams.height, cams.width, cams.elevation[sl], cams.azimuth[sl], cams.distance[sl])
        pos = clip_positions(v_weld, sub)
        rast = rasterize(pos, f_weld, (resolution, resolution), backend=backend)
        covered = rast[..., 3] > 0
        rgb = bg.expand(*covered.shape, 3).clone()
        rgb[covered] = sample_texture(tex, interpolate(uv, rast, f, backend=backend)[covered])
        images.append(antialias(rgb, rast, pos, f_weld, backend=backend, topology=topology).clamp(0, 1).cpu())
    return torch.cat(images)


def _write_png(path: str, images: torch.Tensor) -> str:
    """Write views [n, H, W, 3] in [0, 1] side by side as one 8-bit PNG, atomically."""
    from PIL import Image

    strip = torch.cat(list(images), dim=1).numpy()  # [H, n * W, 3]
    with atomic_path(path) as tmp:
        Image.fromarray(np.round(strip * 255.0).astype(np.uint8), mode="RGB").save(tmp, format="PNG")
    return path


def turntable_path(glb_path: str) -> str:
    """``obj.glb`` -> ``obj_turntable.png`` (where :func:`export_glb` writes the turntable, if asked)."""
    return os.path.splitext(glb_path)[0] + "_turntable.png"


def export_glb(vertices: ArrayLike, faces: ArrayLike, color_fn: Callable[[torch.Tensor], torch.Tensor], path: str,
               config: Optional[ExportConfig] = None, should_stop: Optional[Callable[[], bool]] = None) -> str:
    """Unwrap, bake ``color_fn`` into a texture and write a GLB (the whole SaveGLB job).

    Args:
        vertices: [N, 3] float (numpy or torch; a tensor's device is where ``color_fn`` gets its points).
        faces: [F, 3] integer, counter-clockwise seen from outside.
        color_fn: world points [P, 3] float32 -> albedo [P, 3] in [0, 1] (e.g. a NeRF field's ``albedo``).
        path: destination ``.glb`` (written atomically).
        config: :class:`ExportConfig` (defaults if None).
        should_stop: polled while the unwrap worker runs and between the steps; True stops the export with
            :func:`dreamflow.hosting.raise_interrupt` before anything is written. Default: ComfyUI's Cancel
            (or :func:`dreamflow.hosting.request_interrupt` headless).
    Returns:
        ``path``. With ``config.turntable > 0`` also writes :func:`turntable_path` (``<name>_turntable.png``).
        Files are written only after every step succeeded: an interrupt or error leaves none behind.
    """
    from .. import hosting

    cfg = (config or ExportConfig()).validate()
    stop = should_stop or hosting.interrupt_requested

    def checkpoint(step: str) -> None:
        if stop():
            hosting.raise_interrupt(f"export interrupted {step}; nothing was written")

    device = vertices.device if isinstance(vertices, torch.Tensor) else "cpu"
    # The mesh is checked (and read back to the host) once; the unwrapped copy xatlas returns is valid by
    # construction (vertices2 = v[vmapping], faces2 index it), so the steps below take it unchecked.
    v, f = check_mesh(vertices, faces, "export_glb")
    checkpoint("before the UV unwrap")
    v2, f2, uvs, vmapping = _unwrap_checked(v, f, resolution=cfg.texture_size, chart_padding=cfg.chart_padding,
                                            return_vmapping=True, worker=cfg.unwrap_worker, should_stop=stop)
    checkpoint("after the UV unwrap")
    texture = _bake_checked(v2, f2, uvs, color_fn, size=cfg.texture_size, padding=cfg.padding,
                            backend=cfg.backend, device=device)
    # normals of the welded mesh, copied to seam duplicates: shading stays smooth across UV seams
    normals = _unit_vertex_normals(v, f)[vmapping]
    views = None
    if cfg.turntable > 0:
        checkpoint("after the texture bake")
        views = _turntable_checked(v2, f2, uvs, texture, n_views=cfg.turntable,
                                   resolution=cfg.turntable_resolution, backend=cfg.backend, device=device)
    checkpoint("before writing")
    _write_glb_checked(path, v2, f2, uvs, texture, normals=normals, metallic=cfg.metallic,
                       roughness=cfg.roughness, double_sided=cfg.double_sided)
    if views is not None:
        _write_png(turntable_path(path), views)
    return path
