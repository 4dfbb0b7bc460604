"""Meshes made elsewhere in and out of DreamFlow: files (GLB / glTF / OBJ / PLY), ``trimesh.Trimesh`` objects and
ComfyUI core's ``MESH`` (``comfy_extras/nodes_hunyuan3d.py``: batched ``vertices`` [B, N, 3] / ``faces`` [B, F, 3]).

* :func:`load_mesh_file` / :func:`from_trimesh` / :func:`from_arrays` -> :class:`~dreamflow.state.MeshState` ready
  for MeshStage / SDXLRefine / SaveGLB. Optionally recentred and rescaled into the stages' box (largest half-extent
  ``extent`` world units, as the toy world and extracted meshes); a file's texture or vertex colours initialise
  the colour field by a short fit (:func:`fit_color_field`), so the stages start from the file's own colours.
* :func:`to_trimesh` (vertex colours baked from the colour field) and :func:`to_core_arrays` (vertices / faces for
  core's ``MESH``) hand a DreamFlow mesh on. Vertices and faces round-trip exactly through both.

Frame: +Y up, front +Z (glTF's frame; see ``docs/STATES.md``). Files made Z-up (many scans and PLY / OBJ exports)
are turned with ``up_axis="+Z"``. Every bad input is refused with a one-line :class:`~dreamflow.errors.DreamFlowError`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import List, Optional, Tuple

import numpy as np
import torch

from .errors import DreamFlowError, check
from .scene.mesh import weld_positions
from .scene.nerf import NeRFFieldConfig

MESH_EXTENSIONS = (".glb", ".gltf", ".obj", ".ply")
UP_AXES = ("+Y", "+Z")
MAX_FACES = 500_000
"""Most faces a mesh may keep without decimation (the mesh stages' rasterizer and regularisers scale with it;
extracted meshes have ``ExtractConfig.face_budget`` = 100k)."""


@dataclass
class MeshImportConfig:
    """How a mesh made elsewhere becomes a DreamFlow mesh state."""

    recenter: bool = True
    """Move the bounding box's centre to the origin and scale the largest half-extent to ``extent``."""
    extent: float = 0.45
    """Largest half-extent after rescaling, world units (the toy world's shapes and extracted meshes: ~0.45, inside
    the stages' box [-1, 1]^3 that their cameras frame)."""
    colors: bool = True
    """Keep the file's texture / vertex colours (fit the colour field to them); off: start from a plain field."""
    up_axis: str = "+Y"
    """The file's up axis: "+Y" (glTF, most OBJ) or "+Z" (turned to +Y; the file's -Y becomes the front +Z)."""
    decimate_to: int = 0
    """Decimate meshes with more faces to this many (0: off; more than ``MAX_FACES`` faces is then refused)."""
    fit_steps: int = 100
    """Adam updates of the colour fit (0: no fit)."""
    fit_points: int = 4096
    """Surface points (with the file's colours) per fit update."""
    fit_lr: float = 1e-2
    """Adam learning rate of the colour field's hash grid and MLP during the fit."""
    seed: int = 0
    """Seeds the colour field's initialisation and the fit's surface samples."""
    field: NeRFFieldConfig = dataclass_field(default_factory=NeRFFieldConfig)
    """The colour field (only its albedo is used; the NeRF stage's defaults: 16 hash-grid levels, 2^19 entries)."""

    def validate(self) -> "MeshImportConfig":
        check(self.extent > 0 and math.isfinite(self.extent), f"load mesh: extent={self.extent} must be a finite number > 0 "
                                                               f"(0.45 is usual)")
        check(self.extent <= 1.0, f"load mesh: extent={self.extent} leaves the stages' box [-1, 1]^3; use <= 1 (0.45 is usual)")
        check(self.up_axis in UP_AXES, f"load mesh: up_axis '{self.up_axis}' is unknown; use one of: {', '.join(UP_AXES)}")
        check(0 <= self.decimate_to <= MAX_FACES, f"load mesh: decimate_to={self.decimate_to} must be in 0..{MAX_FACES} "
                                                  f"(0: off)")
        check(self.fit_steps >= 0 and self.fit_points >= 1, f"load mesh: fit_steps={self.fit_steps} must be >= 0 and "
                                                            f"fit_points={self.fit_points} >= 1")
        check(self.fit_lr > 0, f"load mesh: fit_lr={self.fit_lr} must be > 0")
        self.field.validate()
        return self


@dataclass
class SurfaceColors:
    """The colours of a mesh's surface as the file gives them: ``sample(n, generator)`` -> points [n, 3], rgb [n, 3]."""

    vertices: np.ndarray
    faces: np.ndarray
    face_rgb: List
    """Per part: a function (face ids [k], barycentric [k, 3]) -> rgb [k, 3] in [0, 1]; ``part_of_face`` picks it."""
    part_of_face: np.ndarray

    def sample(self, n: int, gen: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        v, f = self.vertices, self.faces
        area = 0.5 * np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1)
        p = area / area.sum() if area.sum() > 0 else np.full(len(f), 1.0 / len(f))
        fid = gen.choice(len(f), size=n, p=p)
        r1, r2 = np.sqrt(gen.random(n)), gen.random(n)
        bary = np.stack([1 - r1, r1 * (1 - r2), r1 * r2], 1)
        points = np.einsum("nk,nkd->nd", bary, v[f[fid]])
        rgb = np.zeros((n, 3))
        for part, fn in enumerate(self.face_rgb):
            sel = self.part_of_face[fid] == part
            if sel.any():
                rgb[sel] = fn(fid[sel], bary[sel])
        return points, np.clip(rgb, 0.0, 1.0)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def _part_colors(geom, name: str, face_offset: int):
    """(rgb function or None) of one trimesh geometry's visual: texture, vertex colours, face colours, material."""
    import trimesh

    visual = getattr(geom, "visual", None)
    faces = np.asarray(geom.faces)
    if visual is None:
        return None
    kind = getattr(visual, "kind", None)
    if kind == "texture":
        material = visual.material
        image = getattr(material, "baseColorTexture", None) or getattr(material, "image", None)
        factor = getattr(material, "baseColorFactor", None)  # glTF: multiplies the texture
        if factor is None and image is None:  # OBJ's Kd: used alone (with map_Kd most tools show the texture as is)
            factor = getattr(material, "diffuse", None)
        factor = np.ones(4) if factor is None else np.asarray(factor, dtype=np.float64).reshape(-1)[:4]
        if factor.max() > 1.0:
            factor = factor / 255.0
        uv = None if visual.uv is None else np.asarray(visual.uv, dtype=np.float64)
        if image is None or uv is None or len(uv) != len(geom.vertices):
            rgb = np.broadcast_to(factor[:3], (1, 3))
            return lambda fid, bary: np.repeat(rgb, len(fid), 0)
        image = image.convert("RGB")

        def tex(fid, bary, uv=uv, image=image, factor=factor):
            uvp = np.einsum("nk,nkd->nd", bary, uv[faces[fid - face_offset]])
            rgba = trimesh.visual.color.uv_to_interpolated_color(uvp, image)
            return rgba[:, :3] / 255.0 * factor[:3]

        return tex
    if kind == "vertex":
        vc = np.asarray(visual.vertex_colors, dtype=np.float64)[:, :3] / 255.0
        return lambda fid, bary: np.einsum("nk,nkd->nd", bary, vc[faces[fid - face_offset]])
    if kind == "face":
        fc = np.asarray(visual.face_colors, dtype=np.float64)[:, :3] / 255.0
        return lambda fid, bary: fc[fid - face_offset]
    return None


def _geometries(path: str, name: str):
    """[(trimesh.Trimesh in world frame)] of a file; one-line errors for files that are not meshes."""
    import trimesh

    try:
        scene = trimesh.load(path, force="scene", process=False)
    except Exception as e:  # parsers raise anything: ValueError, KeyError, struct.error, json errors ...
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise DreamFlowError(f"load mesh: '{name}' is not a readable mesh file ({msg}); export it again as .glb, .obj "
                             f"or .ply") from None
    geoms = []
    for node in scene.graph.nodes_geometry:
        transform, geom_name = scene.graph[node]
        geom = scene.geometry[geom_name]
        if isinstance(geom, trimesh.Trimesh):
            g = geom.copy()
            g.apply_transform(transform)
            geoms.append(g)
    if not geoms:
        kinds = sorted({type(g).__name__ for g in scene.geometry.values()})
        what = f"only {', '.join(kinds)}" if kinds else "nothing"
        raise DreamFlowError(f"load mesh: '{name}' holds no triangle mesh ({what}); DreamFlow needs a surface with faces")
    return geoms


def load_mesh_file(path: str, config: Optional[MeshImportConfig] = None, device="cpu", name: Optional[str] = None):
    """Read a GLB / glTF / OBJ / PLY file into a :class:`~dreamflow.state.MeshState` (see the module doc).

    ``name``: how errors name the file (default: its base name). Raises one-line DreamFlowErrors for an unknown
    extension, a missing or unreadable file, no triangle mesh, no faces, non-finite vertices, too many faces.
    """
    name = name or os.path.basename(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in MESH_EXTENSIONS:
        raise DreamFlowError(f"load mesh: '{name}' has an unknown extension '{ext or '(none)'}'; use one of: "
                             f"{', '.join(MESH_EXTENSIONS)} (convert other formats in a mesh editor)")
    if not os.path.isfile(path):
        raise DreamFlowError(f"load mesh: file '{name}' not found; put it in ComfyUI's input folder (or upload it) "
                             f"and pick it from the list")
    return _from_geometries(_geometries(path, name), name, config, device, source=f"file {name}", weld=True)


def from_trimesh(mesh, config: Optional[MeshImportConfig] = None, device="cpu", name: str = "TRIMESH"):
    """A ``trimesh.Trimesh`` (or ``trimesh.Scene``) -> MeshState, with its colours as :func:`load_mesh_file`."""
    import trimesh

    if isinstance(mesh, trimesh.Scene):
        geoms = [g for g in mesh.dump() if isinstance(g, trimesh.Trimesh)] if mesh.geometry else []
        if not geoms:
            raise DreamFlowError(f"{name}: the scene holds no triangle mesh")
    elif isinstance(mesh, trimesh.Trimesh):
        geoms = [mesh]
    else:
        raise DreamFlowError(f"{name}: expected a trimesh.Trimesh, got {type(mesh).__name__}; connect a node whose "
                             f"output is TRIMESH")
    return _from_geometries(geoms, name, config, device, source=name)


def from_arrays(vertices, faces, config: Optional[MeshImportConfig] = None, device="cpu", name: str = "MESH",
                vertex_colors=None):
    """Vertices [N, 3] / faces [F, 3] (tensors or arrays; optional vertex colours [N, 3] in [0, 1]) -> MeshState."""
    v = _as_numpy(vertices, name, "vertices")
    f = _as_numpy(faces, name, "faces")
    check(v.ndim == 2 and v.shape[1] == 3, f"{name}: vertices have shape {v.shape}; expected [N, 3]")
    check(f.ndim == 2 and f.shape[1] == 3, f"{name}: faces have shape {f.shape}; expected [F, 3] triangles")
    part = None
    if vertex_colors is not None:
        vc = _as_numpy(vertex_colors, name, "vertex colours").astype(np.float64)[:, :3]
        part = lambda fid, bary: np.einsum("nk,nkd->nd", bary, vc[f[fid].astype(np.int64)])  # noqa: E731
    return _build(v, f, [part], np.zeros(len(f), dtype=np.int64), name, config, device, source=name)


def _as_numpy(x, name: str, what: str) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception:
        raise DreamFlowError(f"{name}: {what} are not an array ({type(x).__name__})") from None


def _from_geometries(geoms, name, config, device, source, weld=False):
    vs, fs, parts, part_of_face = [], [], [], []
    n_v = n_f = 0
    for i, g in enumerate(geoms):
        v, f = np.asarray(g.vertices, dtype=np.float64), np.asarray(g.faces, dtype=np.int64)
        if len(f) == 0:
            continue
        parts.append(_part_colors(g, name, n_f))
        vs.append(v)
        fs.append(f + n_v)
        part_of_face.append(np.full(len(f), len(parts) - 1, dtype=np.int64))
        n_v += len(v)
        n_f += len(f)
    if not fs:
        raise DreamFlowError(f"load mesh: '{name}' has vertices but no faces (a point cloud?); DreamFlow needs a surface "
                             f"with triangles")
    return _build(np.concatenate(vs), np.concatenate(fs), parts, np.concatenate(part_of_face), name, config, device,
                  source, weld)


def _build(v: np.ndarray, f: np.ndarray, parts, part_of_face, name, config, device, source, weld=False):
    from . import config as cfgio
    from .state import MeshState
    from .scene.nerf import Background, BackgroundConfig, NeRFField

    cfg = (config or MeshImportConfig()).validate()
    check(f.size > 0 and len(v) > 0, f"load mesh: '{name}' has no faces; DreamFlow needs a surface with triangles")
    check(np.issubdtype(f.dtype, np.integer), f"{name}: faces must be integer vertex indices, got {f.dtype}")
    f = f.astype(np.int64)
    if f.min() < 0 or f.max() >= len(v):
        raise DreamFlowError(f"{name}: faces index vertices {f.min()}..{f.max()} but there are {len(v)}; the mesh is corrupt")
    bad = int((~np.isfinite(v)).any(axis=1).sum())
    if bad:
        raise DreamFlowError(f"load mesh: '{name}' has {bad} vertices with non-finite coordinates (NaN / inf); repair "
                             f"or re-export the mesh")
    if len(f) > MAX_FACES and not cfg.decimate_to:
        raise DreamFlowError(f"load mesh: '{name}' has {len(f):,} faces, more than the {MAX_FACES:,} the mesh stages take; "
                             f"set decimate_to (e.g. 100000)")
    colors = None
    if cfg.colors and any(p is not None for p in parts):
        grey = lambda fid, bary: np.full((len(fid), 3), 0.5)  # noqa: E731  parts without colours
        colors = SurfaceColors(v.copy(), f.copy(), [p or grey for p in parts], part_of_face)
    v = v.astype(np.float64)
    if weld:  # files split vertices at UV seams / hard edges: one vertex per position, so moved geometry stays closed
        v, f = weld_positions(v, f, drop_collapsed=True)
    if cfg.up_axis == "+Z":
        v = np.stack([v[:, 0], v[:, 2], -v[:, 1]], 1)
        if colors is not None:
            colors.vertices = v.copy()
    if cfg.decimate_to and len(f) > cfg.decimate_to:
        import fast_simplification

        v, f = fast_simplification.simplify(v, f.astype(np.int32), target_count=cfg.decimate_to)
        v, f = np.asarray(v, np.float64), np.asarray(f, np.int64)
        check(len(f) > 0, f"load mesh: decimating '{name}' to {cfg.decimate_to} faces left none; raise decimate_to")
    scale, shift = 1.0, np.zeros(3)
    if cfg.recenter:
        lo, hi = v.min(0), v.max(0)
        half = float((hi - lo).max()) / 2
        check(half > 0, f"load mesh: '{name}' is a single point (zero extent); nothing to render")
        shift, scale = -(lo + hi) / 2, cfg.extent / half
    v = (v + shift) * scale
    radius = cfg.field.radius
    reach = float(np.abs(v).max())
    if reach > radius:
        raise DreamFlowError(f"load mesh: '{name}' reaches {reach:.3g} world units from the origin, outside the stages' "
                             f"box [-{radius:g}, {radius:g}]^3; turn on recenter")
    field_ = NeRFField(cfg.field, generator=torch.Generator().manual_seed(cfg.seed))
    background = Background(BackgroundConfig())
    log = []
    if colors is not None:
        colors.vertices = (colors.vertices + shift) * scale
        log = fit_color_field(field_, colors, cfg)
    state = MeshState(field=field_.eval(), background=background.eval(), prompt="", settings=cfgio.to_dict(cfg),
                      guidance_log=[], history=[f"LoadMesh({source})"],
                      vertices=torch.as_tensor(v, dtype=torch.float32),
                      faces=torch.as_tensor(f, dtype=torch.int64))
    state.settings["color_fit"] = log[-1] if log else None
    return state.to(device)


# --------------------------------------------------------------------------------------------
# Colour fit
# --------------------------------------------------------------------------------------------
def fit_color_field(field_, colors: SurfaceColors, config: MeshImportConfig) -> List[dict]:
    """Fit ``field_.albedo`` to the surface colours (MSE, Adam); returns a log of the first / last updates.

    The fit runs where the field is (its time on a CPU: bench/RESULTS.md, "Figures moved from docstrings").
    """
    if config.fit_steps <= 0:
        return []
    gen = np.random.default_rng(config.seed)
    device = next(field_.parameters()).device
    groups = field_.param_groups(lr_grid=config.fit_lr, lr_mlp=config.fit_lr)
    opt = torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15)
    log = []
    with torch.inference_mode(False), torch.enable_grad():
        field_.train()
        for step in range(config.fit_steps):
            p, c = colors.sample(config.fit_points, gen)
            pts = torch.as_tensor(p, dtype=torch.float32, device=device)
            target = torch.as_tensor(c, dtype=torch.float32, device=device)
            loss = (field_.albedo(pts).float() - target).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step == 0 or step == config.fit_steps - 1:
                log.append({"step": step + 1, "mse": float(loss.detach())})
        field_.eval()
    return log


# --------------------------------------------------------------------------------------------
# Out
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def vertex_colors(state) -> np.ndarray:
    """[N, 4] uint8 RGBA: the colour field at each vertex (what a vertex-coloured mesh can carry of the texture)."""
    rgb = state.color_fn()(state.vertices.float()).clamp(0, 1).cpu().numpy()
    rgba = np.concatenate([rgb, np.ones((len(rgb), 1))], 1)
    return np.round(rgba * 255).astype(np.uint8)


def to_trimesh(state, colors: bool = True):
    """MeshState -> ``trimesh.Trimesh`` (vertices float64 holding the float32 values exactly, faces int64, no
    processing), with vertex colours baked from the colour field unless ``colors`` is off."""
    import trimesh

    v = state.vertices.detach().cpu().double().numpy()
    f = state.faces.detach().cpu().long().numpy()
    return trimesh.Trimesh(vertices=v, faces=f, vertex_colors=vertex_colors(state) if colors else None, process=False,
                           validate=False)


def to_core_arrays(state) -> Tuple[torch.Tensor, torch.Tensor]:
    """MeshState -> (vertices [1, N, 3] float32, faces [1, F, 3] int64) on the CPU, core ``MESH``'s batched layout."""
    return (state.vertices.detach().float().cpu().unsqueeze(0).contiguous(),
            state.faces.detach().long().cpu().unsqueeze(0).contiguous())
