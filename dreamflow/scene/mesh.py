"""The mesh stage's scene: a fixed-topology triangle mesh with bounded learnable vertex offsets and a colour field.

Geometry: ``x = x_base + max_offset * tanh(offset)`` per vertex (offsets start at 0, so the stage starts
exactly at the extracted mesh and can never drift further than ``max_offset``). Colour: any module with
``albedo(points [P, 3]) -> [P, 3]`` (e.g. a copy of the NeRF stage's ``NeRFField``), queried at surface
points. Regularisers: uniform-Laplacian smoothness of the offsets and normal consistency across edges.

Also pure helpers (face / vertex normals, unique edges, small primitive meshes) shared by the renderer,
tests and benchmarks. World conventions as in ``render/cameras.py`` (+Y up, object in [-1, 1]^3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DreamFlowError


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------
def weld_positions(vertices: np.ndarray, faces: np.ndarray, decimals: Optional[int] = None,
                   drop_collapsed: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Merge vertices at the same position (UV seams and hard edges split vertices in mesh files and GLBs).

    Args:
        vertices: [N, 3] positions. faces: [F, 3] integer vertex indices.
        decimals: compare positions rounded to that many decimals (None: exactly); the kept position is the
            first vertex's own, unrounded.
        drop_collapsed: drop the faces whose corners merged (False: every face kept, in order, so triangle ids
            of the input index the output too).
    Returns:
        (positions [M, 3] in the order of their first vertex: unchanged when no position repeats, faces
        re-indexed into them, int64, in their input order). numpy, CPU.
    """
    key = vertices if decimals is None else np.round(vertices, decimals)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)  # unique positions by first occurrence
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    faces = rank[inverse.reshape(-1)][faces]
    if drop_collapsed:
        faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 2] != faces[:, 0])]
    return vertices[first[order]], faces


def face_components(n_vertices: int, faces: np.ndarray) -> np.ndarray:
    """Connected part of each face, [F] int labels (faces sharing a vertex are connected; numpy / scipy, CPU).

    Args:
        n_vertices: number of vertices ``faces`` indexes. faces: [F, 3] integer vertex indices.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    a, b = np.concatenate([faces[:, 0], faces[:, 1]]), np.concatenate([faces[:, 1], faces[:, 2]])
    graph = coo_matrix((np.ones(a.size, dtype=np.int8), (a, b)), shape=(n_vertices, n_vertices))
    _, label = connected_components(graph, directed=False)
    return label[faces[:, 0]]

def triangle_neighbors(tri: Tensor) -> Tensor:
    """Edge adjacency of a triangle list (the topology antialiasing and mesh regularisers need).

    Args:
        tri: [F, 3] integer vertex indices.
    Returns:
        [F, 3] int64: entry (f, i) is the triangle sharing the edge opposite vertex i of f, i.e. edge
        (tri[f, i+1], tri[f, i+2]); -1 for a boundary edge or an edge shared by more than two triangles
        (both are treated as silhouettes, as in nvdiffrast).
    """
    tri = tri.long()
    F = tri.shape[0]
    opp = torch.full((F, 3), -1, dtype=torch.int64, device=tri.device)
    if F == 0:
        return opp
    a = tri[:, [1, 2, 0]].reshape(-1)
    b = tri[:, [2, 0, 1]].reshape(-1)
    n = int(tri.max()) + 1
    key = torch.minimum(a, b) * n + torch.maximum(a, b)  # [3F], slot s = 3 f + i
    key_sorted, order = torch.sort(key)
    m = key_sorted.numel()
    same_next = torch.zeros(m, dtype=torch.bool, device=tri.device)
    same_next[:-1] = key_sorted[1:] == key_sorted[:-1]
    same_prev = torch.zeros_like(same_next)
    same_prev[1:] = same_next[:-1]
    same_next2 = torch.zeros_like(same_next)
    same_next2[:-2] = key_sorted[2:] == key_sorted[:-2]
    # A run of exactly two equal keys starting at j: a manifold edge.
    j = (same_next & ~same_prev & ~same_next2).nonzero().squeeze(1)
    s0, s1 = order[j], order[j + 1]
    flat = opp.view(-1)
    flat[s0] = s1 // 3
    flat[s1] = s0 // 3
    return opp


def face_normals(vertices: Tensor, faces: Tensor, normalize: bool = True) -> Tensor:
    """[F, 3] face normals ``(x1 - x0) x (x2 - x0)`` (counter-clockwise faces point outwards).

    Unnormalized, the length is twice the face area (used for area weighting).
    """
    v = vertices[faces.long()]
    n = torch.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0], dim=-1)
    return F.normalize(n, dim=-1, eps=1e-20) if normalize else n


def vertex_normals(vertices: Tensor, faces: Tensor, raw_face_normals: Optional[Tensor] = None) -> Tensor:
    """[N, 3] unit vertex normals: area-weighted mean of the adjacent face normals (0 for unused vertices).

    ``raw_face_normals``: ``face_normals(vertices, faces, normalize=False)`` when the caller has it already.
    """
    n = face_normals(vertices, faces, normalize=False) if raw_face_normals is None else raw_face_normals
    acc = torch.zeros_like(vertices)
    f = faces.long()
    for i in range(3):
        acc = acc.index_add(0, f[:, i], n)
    return F.normalize(acc, dim=-1, eps=1e-20)


def unique_edges(faces: Tensor) -> Tensor:
    """[E, 2] int64 undirected edges (smaller index first), each once."""
    f = faces.long()
    e = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]], 0)
    e = torch.sort(e, dim=1).values
    return torch.unique(e, dim=0)


def adjacent_face_pairs(faces: Tensor) -> Tensor:
    """[A, 2] int64 pairs of faces sharing a manifold edge, each pair once."""
    opp = triangle_neighbors(faces)
    f = torch.arange(faces.shape[0], device=faces.device).unsqueeze(1).expand_as(opp)
    keep = opp > f
    return torch.stack([f[keep], opp[keep]], 1)


def box_mesh(half_size: float = 0.5) -> Tuple[Tensor, Tensor]:
    """Axis-aligned cube centred at the origin: vertices [8, 3] float32, faces [12, 3] int64 (outward, CCW)."""
    s = float(half_size)
    v = torch.tensor([[x, y, z] for x in (-s, s) for y in (-s, s) for z in (-s, s)], dtype=torch.float32)
    # vertex index = 4 * (x > 0) + 2 * (y > 0) + (z > 0)
    f = torch.tensor([
        [0, 1, 3], [0, 3, 2],  # -X
        [4, 6, 7], [4, 7, 5],  # +X
        [0, 4, 5], [0, 5, 1],  # -Y
        [2, 3, 7], [2, 7, 6],  # +Y
        [0, 2, 6], [0, 6, 4],  # -Z
        [1, 5, 7], [1, 7, 3],  # +Z
    ], dtype=torch.int64)
    return v, f


def uv_sphere(n_lat: int = 16, n_lon: int = 32, radius: float = 0.5) -> Tuple[Tensor, Tensor]:
    """Closed UV sphere: ``2 + (n_lat - 1) * n_lon`` vertices, ``2 * (n_lat - 1) * n_lon`` faces (outward).

    n_lat=126, n_lon=200 gives 50,000 faces (the benchmark's sphere).
    """
    if n_lat < 2 or n_lon < 3:
        raise DreamFlowError(f"uv_sphere: n_lat={n_lat}, n_lon={n_lon} too small; need n_lat >= 2, n_lon >= 3")
    theta = torch.arange(1, n_lat, dtype=torch.float64) * math.pi / n_lat  # from +Y down
    phi = torch.arange(n_lon, dtype=torch.float64) * 2 * math.pi / n_lon
    t, p = torch.meshgrid(theta, phi, indexing="ij")
    ring = torch.stack([torch.sin(t) * torch.sin(p), torch.cos(t), torch.sin(t) * torch.cos(p)], -1).reshape(-1, 3)
    v = torch.cat([torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64), ring,
                   torch.tensor([[0.0, -1.0, 0.0]], dtype=torch.float64)]) * radius
    bottom = v.shape[0] - 1
    faces: List[Tensor] = []
    j = torch.arange(n_lon)
    jn = (j + 1) % n_lon
    faces.append(torch.stack([torch.zeros_like(j), 1 + j, 1 + jn], 1))  # top cap
    for r in range(n_lat - 2):
        a, b = 1 + r * n_lon + j, 1 + r * n_lon + jn
        c, d = a + n_lon, b + n_lon
        faces += [torch.stack([a, c, d], 1), torch.stack([a, d, b], 1)]
    last = 1 + (n_lat - 2) * n_lon
    faces.append(torch.stack([last + j, torch.full_like(j, bottom), last + jn], 1))  # bottom cap
    return v.float(), torch.cat(faces).long()


def grid_mesh(n: int = 8, size: float = 1.0) -> Tuple[Tensor, Tensor]:
    """Flat square grid in the XZ plane (y = 0), normals +Y: vertices [(n+1)^2, 3], faces [2 n^2, 3]."""
    t = torch.linspace(-size / 2, size / 2, n + 1)
    z, x = torch.meshgrid(t, t, indexing="ij")
    v = torch.stack([x, torch.zeros_like(x), z], -1).reshape(-1, 3)
    i, k = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    a = (i * (n + 1) + k).reshape(-1)
    b, c, d = a + 1, a + n + 1, a + n + 2
    return v, torch.cat([torch.stack([a, c, d], 1), torch.stack([a, d, b], 1)]).long()


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
@dataclass
class MeshModelConfig:
    """Mesh-stage geometry settings."""

    max_offset: float = 0.05
    """Largest distance a vertex may move from the extracted mesh, world units (object in [-1, 1]^3);
    ``x = x_base + max_offset * tanh(offset)`` (chosen by trial: enough to fix marching-cubes noise, too
    little to tear the surface)."""
    offset_init_std: float = 0.0
    """Std of the initial raw offsets (0: start exactly on the base mesh; tests use > 0)."""

    def validate(self) -> "MeshModelConfig":
        if not (self.max_offset >= 0 and math.isfinite(self.max_offset)):
            raise DreamFlowError(f"mesh max_offset={self.max_offset} must be a finite number >= 0 (world units)")
        if not self.offset_init_std >= 0:
            raise DreamFlowError(f"mesh offset_init_std={self.offset_init_std} must be >= 0")
        return self


@dataclass
class DeformedMesh:
    """The deformed geometry of a :class:`MeshModel` at its current offsets, computed once per update and
    shared by the renderer and the regularisers (each would otherwise recompute tanh, the vertices and
    the face normals). All differentiable in ``offset``."""

    vertices: Tensor
    """[N, 3] ``base + displacement``, world units."""
    displacement: Tensor
    """[N, 3] ``max_offset * tanh(offset)``, world units."""
    face_normals: Tensor
    """[F, 3] unit outward face normals."""
    vertex_normals: Tensor
    """[N, 3] unit area-weighted vertex normals (what ``render_mesh`` interpolates)."""


class MeshModel(nn.Module):
    """Triangle mesh with bounded learnable vertex offsets and a colour field.

    Buffers: ``base_vertices`` [N, 3] float32, ``faces`` [F, 3] int64 (saved); ``edges`` [E, 2] and
    ``face_pairs`` [A, 2] (derived once, not saved). Parameter: ``offset`` [N, 3] (raw, pre-tanh).
    Submodule: ``color`` with ``albedo(points [P, 3]) -> [P, 3]`` in [0, 1].
    """

    def __init__(self, vertices: Tensor, faces: Tensor, color: nn.Module, cfg: Optional[MeshModelConfig] = None):
        super().__init__()
        self.cfg = (cfg or MeshModelConfig()).validate()
        if not torch.is_tensor(vertices) or vertices.dim() != 2 or vertices.shape[1] != 3 or vertices.shape[0] < 3:
            raise DreamFlowError(f"MeshModel: vertices have shape {tuple(getattr(vertices, 'shape', ()))}; expected [N >= 3, 3]")
        if not torch.isfinite(vertices).all():
            raise DreamFlowError("MeshModel: vertices contain NaN/inf; re-extract the mesh from a finite NeRF state")
        if not torch.is_tensor(faces) or faces.dim() != 2 or faces.shape[1] != 3 or faces.shape[0] < 1 or faces.is_floating_point():
            raise DreamFlowError(f"MeshModel: faces have shape {tuple(getattr(faces, 'shape', ()))}; expected integer [F >= 1, 3]")
        if int(faces.min()) < 0 or int(faces.max()) >= vertices.shape[0]:
            raise DreamFlowError(f"MeshModel: faces index vertices {int(faces.min())}..{int(faces.max())} but there are "
                                 f"{vertices.shape[0]}; the mesh is corrupt")
        if not callable(getattr(color, "albedo", None)):
            raise DreamFlowError(f"MeshModel: colour module {type(color).__name__} has no albedo(points) method; "
                                 f"pass a NeRFField or a module with albedo(points [P, 3]) -> [P, 3]")
        self.register_buffer("base_vertices", vertices.detach().float().clone())
        self.register_buffer("faces", faces.detach().long().clone())
        self.register_buffer("edges", unique_edges(self.faces), persistent=False)
        self.register_buffer("face_pairs", adjacent_face_pairs(self.faces), persistent=False)
        degree = torch.zeros(vertices.shape[0]).index_add(0, self.edges.reshape(-1).cpu(), torch.ones(self.edges.numel()))
        self.register_buffer("degree", degree.clamp_min(1).to(vertices.device), persistent=False)
        self.offset = nn.Parameter(torch.randn_like(self.base_vertices) * self.cfg.offset_init_std)
        self.color = color

    # ---- geometry --------------------------------------------------------------------------
    def vertices(self) -> Tensor:
        """[N, 3] deformed vertices ``base + max_offset * tanh(offset)`` (differentiable in ``offset``)."""
        return self.base_vertices + self.cfg.max_offset * torch.tanh(self.offset)

    def displacement(self) -> Tensor:
        """[N, 3] ``vertices() - base_vertices``; each component is bounded by ``max_offset``."""
        return self.cfg.max_offset * torch.tanh(self.offset)

    def deform(self) -> DeformedMesh:
        """Vertices, displacement and normals of the deformed mesh, each computed once (the same values,
        bit for bit, as :meth:`vertices`, :meth:`displacement`, :meth:`face_normals`, :meth:`vertex_normals`)."""
        d = self.displacement()
        v = self.base_vertices + d
        raw = face_normals(v, self.faces, normalize=False)
        return DeformedMesh(vertices=v, displacement=d, face_normals=F.normalize(raw, dim=-1, eps=1e-20),
                            vertex_normals=vertex_normals(v, self.faces, raw_face_normals=raw))

    def face_normals(self) -> Tensor:
        """[F, 3] unit outward face normals of the deformed mesh."""
        return face_normals(self.vertices(), self.faces)

    def vertex_normals(self) -> Tensor:
        """[N, 3] unit area-weighted vertex normals of the deformed mesh."""
        return vertex_normals(self.vertices(), self.faces)

    def albedo(self, points: Tensor) -> Tensor:
        """[P, 3] colour field at world points [P, 3] (delegates to ``color.albedo``)."""
        return self.color.albedo(points)

    # ---- regularisers ----------------------------------------------------------------------
    def laplacian_loss(self, deformed: Optional[DeformedMesh] = None) -> Tensor:
        """Uniform-Laplacian smoothness of the displacement: ``mean_i || d_i - mean_{j in N(i)} d_j ||^2``.

        The uniform Laplacian is linear, so this is the Laplacian of the deformed vertices measured
        against the base mesh's: it keeps the base's detail and penalises only rough deformations
        (0 at init and for any rigid translation). Units: world units squared. ``deformed``: this update's
        :meth:`deform` (else the displacement is recomputed).
        """
        d = self.displacement() if deformed is None else deformed.displacement
        i, j = self.edges[:, 0], self.edges[:, 1]
        nbr = torch.zeros_like(d).index_add(0, i, d[j]).index_add(0, j, d[i])
        lap = d - nbr / self.degree.unsqueeze(1)
        return lap.square().sum(1).mean()

    def normal_consistency_loss(self, deformed: Optional[DeformedMesh] = None) -> Tensor:
        """``mean (1 - cos(n_a, n_b))`` over pairs of faces sharing an edge: 0 when flat, in [0, 2].

        ``deformed``: this update's :meth:`deform` (else the face normals are recomputed).
        """
        if self.face_pairs.shape[0] == 0:
            return self.offset.sum() * 0
        n = self.face_normals() if deformed is None else deformed.face_normals
        cos = (n[self.face_pairs[:, 0]] * n[self.face_pairs[:, 1]]).sum(-1)
        return (1 - cos).mean()

    # ---- optimisation ----------------------------------------------------------------------
    def param_groups(self, lr_geometry: float, lr_grid: float, lr_mlp: float) -> List[Dict]:
        """Optimizer groups: ``offset`` at lr_geometry, then the colour field's groups.

        A colour field with its own ``param_groups(lr_grid=, lr_mlp=)`` (``NeRFField``) decides its split;
        otherwise parameters whose name mentions ``grid`` / ``encoding`` / ``hash`` / ``embed`` get lr_grid
        (hash tables) and the rest (MLPs) lr_mlp. Empty groups are dropped; each group has a ``name``.
        """
        groups = [{"name": "geometry", "params": [self.offset], "lr": lr_geometry}]
        own = getattr(self.color, "param_groups", None)
        if callable(own):
            groups += [dict(g, params=list(g["params"])) for g in own(lr_grid=lr_grid, lr_mlp=lr_mlp)]
        else:
            grid, mlp = [], []
            for name, p in self.color.named_parameters():
                if p.requires_grad:
                    (grid if any(k in name.lower() for k in ("grid", "encoding", "hash", "embed")) else mlp).append(p)
            groups += [{"name": "grid", "params": grid, "lr": lr_grid}, {"name": "mlp", "params": mlp, "lr": lr_mlp}]
        return [g for g in groups if g["params"]]
