"""Differentiable triangle rasterization with nvdiffrast's semantics: one functional API, two backends.

``rasterize -> interpolate -> antialias``, as in nvdiffrast (Laine et al., SIGGRAPH Asia 2020), with one
deliberate difference: images are **top row first** (row 0 is NDC y = +1), like every image in DreamFlow
(see ``render/cameras.py``); nvdiffrast's bottom-first rows are flipped at the boundary.

Backends (picked only by :func:`dreamflow.backends.pick`):

* ``"cuda"``: nvdiffrast's ``RasterizeCudaContext`` (one cached context per device).
* ``"torch"``: a vectorised pure-torch twin for CPU and users without nvdiffrast:

  1. no grad: per-triangle pixel bounding boxes; the (triangle, pixel) pairs of all boxes are walked in
     fixed-size chunks; 2D homogeneous edge functions (Olano & Greer 1997) decide coverage, which needs
     no clipping for vertices behind the camera; per-pixel ``-1 <= z/w <= 1`` is the near/far clip;
     a z-buffer keeps the closest triangle (lowest triangle index on exact depth ties);
  2. with grad: for the winning triangle of each covered pixel, perspective-correct barycentrics are
     recomputed from the vertex positions, so gradients reach ``pos_clip`` through (u, v) and reach
     attributes through :func:`interpolate`, as in nvdiffrast. Like nvdiffrast, z/w carries no gradient.

Pixel centres sit at NDC ``x = (2j + 1) / W - 1`` and ``y = 1 - (2i + 1) / H`` for column j, row i.
Coverage at a pixel centre lying exactly on an edge may differ between backends (fill rules).
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, Sequence, Tuple

import torch
from torch import Tensor

from .. import backends
from ..errors import DreamFlowError
from ..scene.mesh import triangle_neighbors  # mesh topology (antialias's silhouettes)

#: (triangle, pixel) pairs evaluated per chunk by the torch rasterizer: bounds the no-grad pass's memory
#: whatever the resolution and face count
#: (its peak, measured on a CPU: bench/RESULTS.md, "Figures moved from docstrings").
DEFAULT_CHUNK_PAIRS = 1 << 19

_INT64_MAX = torch.iinfo(torch.int64).max
_cuda_contexts: Dict[Any, Any] = {}


# --------------------------------------------------------------------------------------------
# Input checks and helpers
# --------------------------------------------------------------------------------------------
def _as_batched_pos(pos_clip: Tensor, where: str) -> Tensor:
    """[N, 4] or [V, N, 4] float -> [V, N, 4] (a view)."""
    if not torch.is_tensor(pos_clip) or pos_clip.dim() not in (2, 3) or pos_clip.shape[-1] != 4:
        shape = tuple(pos_clip.shape) if torch.is_tensor(pos_clip) else type(pos_clip).__name__
        raise DreamFlowError(f"{where}: pos_clip has shape {shape}; expected clip-space positions [N, 4] or [V, N, 4]")
    if not pos_clip.is_floating_point():
        raise DreamFlowError(f"{where}: pos_clip has dtype {pos_clip.dtype}; expected a float tensor")
    return pos_clip if pos_clip.dim() == 3 else pos_clip.unsqueeze(0)


def _tri_range(tri: Tensor) -> Tuple[int, int]:
    """(min, max) of a non-empty index tensor: one host sync (two scalars read back together)."""
    lo, hi = torch.stack([tri.min(), tri.max()]).tolist()
    return int(lo), int(hi)


class _CheckedTri:
    """What is known about one triangle tensor: its index range and its int64 / int32 forms."""

    __slots__ = ("ref", "stamp", "lo", "hi", "long", "int32")

    def __init__(self, tri: Tensor, stamp: tuple, on_free):
        self.ref = weakref.ref(tri, on_free)
        self.stamp = stamp
        tri_long = tri.long()
        self.lo, self.hi = _tri_range(tri_long) if tri.numel() else (0, -1)
        # Only converted copies are kept: holding ``tri`` itself would keep it alive through the cache.
        self.long = None if tri_long is tri else tri_long
        self.int32 = None


#: id(tri) -> _CheckedTri for the triangle tensors already checked. The range check reads indices back to
#: the host (a sync on CUDA); a stage passes the same faces to rasterize / interpolate / antialias every
#: update, so each tensor is read once. An in-place change bumps the tensor's version (or a new storage
#: its data_ptr) and it is checked again; entries go when their tensor is freed.
_checked_tris: Dict[int, _CheckedTri] = {}


def _checked(tri: Tensor) -> _CheckedTri:
    """The cache entry of ``tri``, built on first use. Tensors without a version counter (made under
    ``torch.inference_mode``) get a fresh, uncached entry at every call."""
    try:
        version = tri._version
    except RuntimeError:
        return _CheckedTri(tri, (), None)
    key = id(tri)
    stamp = (version, tri.data_ptr(), tuple(tri.shape), tri.dtype, tri.device)
    entry = _checked_tris.get(key)
    if entry is not None and entry.ref() is tri and entry.stamp == stamp:
        return entry

    def on_free(ref, key=key):
        if key in _checked_tris and _checked_tris[key].ref is ref:
            del _checked_tris[key]

    entry = _checked_tris[key] = _CheckedTri(tri, stamp, on_free)
    return entry


def _check_tri(tri: Tensor, n_vertices: int, where: str) -> Tensor:
    """[F, 3] integer triangle indices -> int64, each checked to lie in [0, n_vertices).

    A given tensor's index range is read back once (see ``_checked_tris``); later calls compare the cached
    range with ``n_vertices`` without touching the device and return the same int64 tensor.
    """
    if not torch.is_tensor(tri) or tri.dim() != 2 or tri.shape[1] != 3 or tri.is_floating_point():
        shape = tuple(tri.shape) if torch.is_tensor(tri) else type(tri).__name__
        raise DreamFlowError(f"{where}: tri has shape/dtype {shape}; expected integer vertex indices [F, 3]")
    entry = _checked(tri)
    if tri.numel() and (entry.lo < 0 or entry.hi >= n_vertices):
        raise DreamFlowError(
            f"{where}: tri indexes vertices {entry.lo}..{entry.hi} but there are {n_vertices}; "
            f"fix the face list (indices are 0-based)")
    return tri if entry.long is None else entry.long


def _tri_int32(tri: Tensor) -> Tensor:
    """Contiguous int32 triangles for nvdiffrast (converted once per checked tensor)."""
    if tri.dtype == torch.int32 and tri.is_contiguous():
        return tri
    entry = _checked(tri)
    if entry.int32 is None:
        entry.int32 = tri.int().contiguous()
    return entry.int32


def _check_resolution(resolution: Sequence[int]) -> Tuple[int, int]:
    try:
        H, W = (int(r) for r in resolution)
    except (TypeError, ValueError):
        raise DreamFlowError(f"rasterize: resolution {resolution!r} is not (height, width)") from None
    if H <= 0 or W <= 0:
        raise DreamFlowError(f"rasterize: resolution {(H, W)} must be positive (height, width)")
    return H, W


def _pixel_ndc(flat: Tensor, H: int, W: int, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """NDC (x, y) of pixel centres given flat indices ``v * H * W + row * W + col`` (row 0 = top)."""
    rem = flat % (H * W)
    row, col = rem // W, rem % W
    x = (2 * col + 1).to(dtype) / W - 1
    y = 1 - (2 * row + 1).to(dtype) / H
    return x, y


def _edge_functions(v: Tensor) -> Tensor:
    """Homogeneous 2D edge functions of triangles.

    Args:
        v: [..., 3, 4] clip-space vertices (x, y, z, w) of each triangle.
    Returns:
        [..., 3, 3] rows ``e_i = v_{i+1} x v_{i+2}`` on (x, y, w); ``lambda_i(p) = e_i . (p_x, p_y, 1)`` is
        proportional to the perspective-correct barycentric of vertex i at NDC point p (Olano & Greer 1997).
        Two triangles sharing an edge get exactly negated edge functions for it (IEEE a*b - c*d is
        antisymmetric), so a shared edge leaves neither gaps nor ambiguity beyond exact zeros.
    """
    h = v[..., [0, 1, 3]]
    a, b = h[..., [1, 2, 0], :], h[..., [2, 0, 1], :]
    # Not torch.cross: its CPU kernel contracts a*b - c*d into a fused multiply-add, which breaks the exact
    # antisymmetry above and opens one-pixel cracks along shared edges. Separate ops round each product.
    p = a[..., [1, 2, 0]] * b[..., [2, 0, 1]]
    q = a[..., [2, 0, 1]] * b[..., [1, 2, 0]]
    return p - q


def _eval_edges(e: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """``lambda_i = e_i . (x, y, 1)`` for e [K, 3, 3] and points x, y [K] -> [K, 3]."""
    return e[..., 0] * x.unsqueeze(-1) + e[..., 1] * y.unsqueeze(-1) + e[..., 2]


def _sortable_depth(zw: Tensor) -> Tensor:
    """float32 depth -> int64 in (-2^31, 2^31) whose integer order equals the float order (exact).

    Signed, so that ``key << 32`` stays inside int64 with its order kept (an offset of 2^31 would wrap
    positive depths to negative keys and let a farther fragment win the z-test).
    """
    bits = zw.to(torch.float32).contiguous().view(torch.int32).long()
    # IEEE floats: positive ones order like their bit patterns, negative ones in reverse.
    return torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF))


# --------------------------------------------------------------------------------------------
# Torch backend
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def _visible_triangles(pos: Tensor, tri: Tensor, H: int, W: int, chunk_pairs: int) -> Tensor:
    """Closest triangle per pixel (no grad).

    Args:
        pos: [V, N, 4] clip-space positions (any float dtype).
        tri: [F, 3] int64.
    Returns:
        [V, H, W] int64 triangle index, -1 where no triangle covers the pixel centre.
    """
    V = pos.shape[0]
    F = tri.shape[0]
    out = torch.full((V, H * W), -1, dtype=torch.int64, device=pos.device)
    if F == 0:
        return out.view(V, H, W)
    for view in range(V):
        verts = pos[view][tri]  # [F, 3, 4]
        x, y, z, w = verts.unbind(-1)
        # Whole triangle outside one clip plane (valid for any sign of w: the set is convex).
        outside = ((x > w).all(1) | (x < -w).all(1) | (y > w).all(1) | (y < -w).all(1)
                   | (z > w).all(1) | (z < -w).all(1) | (w <= 0).all(1))
        e = _edge_functions(verts)  # [F, 3, 3]
        det = (e[:, 0, :] * verts[:, 0, [0, 1, 3]]).sum(-1)  # v0 . (v1 x v2)
        keep = ~outside & (det != 0) & torch.isfinite(det)
        # Pixel bounding boxes; a triangle with a vertex behind the eye projects unboundedly: whole screen.
        front = (w > 0).all(1)
        ws = torch.where(w > 0, w, torch.ones_like(w))
        xs, ys = x / ws, y / ws
        # Widened by up to one pixel so rounding of x / w never drops a pixel the edge test accepts.
        c0 = torch.floor((xs.amin(1) + 1) * (W / 2) - 0.5).clamp(0, W - 1)
        c1 = torch.ceil((xs.amax(1) + 1) * (W / 2) - 0.5).clamp(0, W - 1)
        r0 = torch.floor((1 - ys.amax(1)) * (H / 2) - 0.5).clamp(0, H - 1)
        r1 = torch.ceil((1 - ys.amin(1)) * (H / 2) - 0.5).clamp(0, H - 1)
        c0 = torch.where(front, c0, torch.zeros_like(c0)).long()
        c1 = torch.where(front, c1, torch.full_like(c1, W - 1)).long()
        r0 = torch.where(front, r0, torch.zeros_like(r0)).long()
        r1 = torch.where(front, r1, torch.full_like(r1, H - 1)).long()
        # Boxes entirely off screen clamp to an edge column/row: x range test removes them.
        on_screen = front.logical_not() | ((xs.amax(1) >= -1 - 2.0 / W) & (xs.amin(1) <= 1 + 2.0 / W)
                                           & (ys.amax(1) >= -1 - 2.0 / H) & (ys.amin(1) <= 1 + 2.0 / H))
        keep &= on_screen
        ids = keep.nonzero().squeeze(1)
        if ids.numel() == 0:
            continue
        e = e[ids] * det[ids].sign().view(-1, 1, 1)  # exact: lambda_i >= 0 inside for both windings
        zv, wv = z[ids], w[ids]
        c0, r0 = c0[ids], r0[ids]
        bw = c1[ids] - c0 + 1
        counts = bw * (r1[ids] - r0 + 1)
        ends = counts.cumsum(0)
        total = int(ends[-1])
        zbuf = torch.full((H * W,), _INT64_MAX, dtype=torch.int64, device=pos.device)
        # Walk the concatenated (triangle, pixel) pairs of all boxes in fixed chunks: a huge triangle
        # is split across chunks, so memory stays bounded at any resolution.
        for start in range(0, total, chunk_pairs):
            g = torch.arange(start, min(start + chunk_pairs, total), device=pos.device)
            k = torch.searchsorted(ends, g, right=True)
            local = g - (ends[k] - counts[k])
            col = c0[k] + local % bw[k]
            row = r0[k] + local // bw[k]
            px = (2 * col + 1).to(pos.dtype) / W - 1
            py = 1 - (2 * row + 1).to(pos.dtype) / H
            lam = _eval_edges(e[k], px, py)  # [B, 3]
            inside = (lam >= 0).all(1)
            k, lam, pix = k[inside], lam[inside], (row * W + col)[inside]
            zw = (lam * zv[k]).sum(1) / (lam * wv[k]).sum(1)
            ok = (zw >= -1) & (zw <= 1)
            k, zw, pix = k[ok], zw[ok], pix[ok]
            key = (_sortable_depth(zw) << 32) | ids[k]
            zbuf.scatter_reduce_(0, pix, key, reduce="amin")
        hit = zbuf != _INT64_MAX
        out[view] = torch.where(hit, zbuf & 0xFFFFFFFF, torch.full_like(zbuf, -1))
    return out.view(V, H, W)


def _rasterize_torch(pos: Tensor, tri: Tensor, H: int, W: int, chunk_pairs: int) -> Tensor:
    """Torch twin of nvdiffrast's rasterize; see the module docstring. Returns [V, H, W, 4] in pos.dtype."""
    V = pos.shape[0]
    tid = _visible_triangles(pos.detach(), tri, H, W, chunk_pairs).view(-1)
    q = (tid >= 0).nonzero().squeeze(1)  # flat covered pixels
    t = tid[q]
    view = q // (H * W)
    verts = pos[view.unsqueeze(1), tri[t]]  # [P, 3, 4]
    px, py = _pixel_ndc(q, H, W, pos.dtype)
    lam = _eval_edges(_edge_functions(verts), px, py)  # [P, 3], differentiable in verts
    b = lam / lam.sum(1, keepdim=True)  # perspective-correct barycentrics
    with torch.no_grad():  # nvdiffrast: z/w propagates no gradient
        zw = (lam * verts[..., 2]).sum(1) / (lam * verts[..., 3]).sum(1)
    vals = torch.stack([b[:, 0], b[:, 1], zw, (t + 1).to(pos.dtype)], dim=1)
    rast = pos.new_zeros(V * H * W, 4).index_put((q,), vals)
    return rast.view(V, H, W, 4)


def _interpolate_torch(attr: Tensor, rast: Tensor, tri: Tensor) -> Tensor:
    V, H, W, _ = rast.shape
    flat = rast.reshape(V * H * W, 4)
    tid = flat[:, 3].detach().long() - 1
    q = (tid >= 0).nonzero().squeeze(1)
    t = tid[q]
    idx = tri[t]  # [P, 3]
    if attr.dim() == 3:
        a = attr[(q // (H * W)).unsqueeze(1), idx]  # [P, 3, C]
    else:
        a = attr[idx]
    u, v = flat[q, 0:1], flat[q, 1:2]
    vals = u * a[:, 0] + v * a[:, 1] + (1 - u - v) * a[:, 2]
    out = vals.new_zeros(V * H * W, attr.shape[-1]).index_put((q,), vals)
    return out.view(V, H, W, attr.shape[-1])


def _antialias_torch(color: Tensor, rast: Tensor, pos: Tensor, tri: Tensor, opp: Tensor) -> Tensor:
    """Analytic silhouette anti-aliasing (torch twin of nvdiffrast's antialias, our own derivation).

    For every pair of horizontally or vertically adjacent pixels (p, q) showing different triangles, the
    occluder T is the nearer one (or the only one). If the first edge of T crossed going from p's centre to
    q's is a silhouette (a boundary edge, or its neighbour faces the other way), the edge crosses the
    segment at fraction ``t`` (screen-space linear edge function). Pixel footprints are unit boxes around
    the centres, so T covers ``t - 1/2`` of q's box when ``t > 1/2`` (q moves that far towards p's
    colour), else p loses ``1/2 - t`` of its box to q's colour. Exact coverage for axis-aligned edges;
    gradients reach the edge vertices through ``t`` and both colours through the blend.
    """
    V, H, W, C = color.shape
    cflat = color.reshape(V * H * W, C)
    tid = rast[..., 3].detach().reshape(-1).long() - 1
    zw = rast[..., 2].detach().reshape(-1)
    idx = torch.arange(V * H * W, device=color.device).view(V, H, W)
    a = torch.cat([idx[:, :, :-1].reshape(-1), idx[:, :-1, :].reshape(-1)])
    b = torch.cat([idx[:, :, 1:].reshape(-1), idx[:, 1:, :].reshape(-1)])
    diff = tid[a] != tid[b]
    a, b = a[diff], b[diff]
    ta, tb = tid[a], tid[b]
    use_a = (ta >= 0) & ((tb < 0) | (zw[a] < zw[b]))
    p = torch.where(use_a, a, b)
    q = torch.where(use_a, b, a)
    T = torch.where(use_a, ta, tb)
    view = p // (H * W)
    K = p.numel()
    if K == 0:
        return color
    verts = pos[view.unsqueeze(1), tri[T]]  # [K, 3, 4]
    e = _edge_functions(verts)
    with torch.no_grad():
        s = (e[:, 0, :] * verts[:, 0, [0, 1, 3]]).sum(-1).sign()
    e = e * s.view(-1, 1, 1)
    xp, yp = _pixel_ndc(p, H, W, pos.dtype)
    xq, yq = _pixel_ndc(q, H, W, pos.dtype)
    lp = _eval_edges(e, xp, yp).clamp_min(0)
    lq = _eval_edges(e, xq, yq)
    with torch.no_grad():
        exits = lq < 0
        t_all = torch.where(exits, lp / (lp - lq).clamp_min(1e-30), torch.full_like(lp, float("inf")))
        edge = t_all.argmin(1)
        nb = opp[T, edge]
        nb_verts = pos[view.unsqueeze(1), tri[nb.clamp_min(0)]]
        nb_e = _edge_functions(nb_verts)
        nb_s = (nb_e[:, 0, :] * nb_verts[:, 0, [0, 1, 3]]).sum(-1).sign()
        silhouette = (nb < 0) | (nb_s != s)
        valid = exits.any(1) & silhouette
    sel = valid.nonzero().squeeze(1)
    if sel.numel() == 0:
        return color
    lp_e = lp[sel, edge[sel]]
    lq_e = lq[sel, edge[sel]]
    t = lp_e / (lp_e - lq_e)  # crossing, 0 at p's centre, 1 at q's
    p, q = p[sel], q[sel]
    into_q = t >= 0.5
    target = torch.where(into_q, q, p)
    source = torch.where(into_q, p, q)
    weight = torch.where(into_q, t - 0.5, 0.5 - t).unsqueeze(1)
    delta = weight * (cflat[source] - cflat[target])
    return cflat.index_add(0, target, delta).view(V, H, W, C)


# --------------------------------------------------------------------------------------------
# CUDA backend (nvdiffrast)
# --------------------------------------------------------------------------------------------
def _cuda_context(device: torch.device):
    dr = backends.nvdiffrast_torch()
    key = (device.type, device.index if device.index is not None else torch.cuda.current_device())
    if key not in _cuda_contexts:
        _cuda_contexts[key] = dr.RasterizeCudaContext(device=device)
    return _cuda_contexts[key]


def _resolve(backend: str, *tensors: Tensor) -> str:
    """Backend for this call: ``pick`` decides; CPU tensors always take the torch path."""
    choice = backends.pick("raster", backend)
    if choice == "cuda" and not all(t.is_cuda for t in tensors):
        if backend == "cuda":
            raise DreamFlowError("raster backend 'cuda' needs CUDA tensors but got CPU ones; move them with .cuda() "
                                 "or use backend='auto'")
        return "torch"
    return choice


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def rasterize(pos_clip: Tensor, tri: Tensor, resolution: Sequence[int], backend: str = "auto",
              chunk_pairs: int = DEFAULT_CHUNK_PAIRS) -> Tensor:
    """Rasterize triangles (nvdiffrast ``rasterize`` semantics, top row first).

    Args:
        pos_clip: [V, N, 4] or [N, 4] float clip-space vertex positions (after ``cameras.mvp()``);
            [N, 4] means one view. ``"cuda"`` needs float32 CUDA tensors.
        tri: [F, 3] int32/int64 vertex indices; the same triangles in every view.
        resolution: (H, W) pixels.
        backend: ``"auto"`` | ``"cuda"`` | ``"torch"`` (see ``dreamflow/backends.py``).
        chunk_pairs: torch backend: (triangle, pixel) pairs tested per chunk (memory bound).
    Returns:
        [V, H, W, 4] in pos_clip's dtype: (u, v, z/w, triangle_id + 1) per pixel, all 0 where no triangle
        covers the pixel centre. u, v are perspective-correct barycentrics of the triangle's first and second
        vertex (the third gets 1 - u - v); z/w in [-1, 1], larger is farther. Row 0 is the top (NDC y = +1).
        Gradients flow to pos_clip through u, v only.
    """
    pos = _as_batched_pos(pos_clip, "rasterize")
    tri_in, tri = tri, _check_tri(tri, pos.shape[1], "rasterize")
    H, W = _check_resolution(resolution)
    if int(chunk_pairs) < 1:
        raise DreamFlowError(f"rasterize: chunk_pairs={chunk_pairs} must be >= 1")
    if _resolve(backend, pos) == "cuda":
        dr = backends.nvdiffrast_torch()
        rast, _ = dr.rasterize(_cuda_context(pos.device), pos.float().contiguous(), _tri_int32(tri_in),
                               (H, W), grad_db=False)
        return rast.flip(1)
    return _rasterize_torch(pos, tri, H, W, int(chunk_pairs))


def interpolate(attr: Tensor, rast: Tensor, tri: Tensor, backend: str = "auto") -> Tensor:
    """Interpolate vertex attributes over the rasterized pixels (nvdiffrast ``interpolate``).

    Args:
        attr: [N, C] (shared by all views) or [V, N, C] / [1, N, C] float per-vertex attributes.
        rast: [V, H, W, 4] from :func:`rasterize` (top row first).
        tri: [F, 3] the triangles given to :func:`rasterize`.
        backend: as in :func:`rasterize`.
    Returns:
        [V, H, W, C]: ``u * a0 + v * a1 + (1 - u - v) * a2`` of the pixel's triangle, 0 where empty.
        Differentiable in attr and in rast's (u, v) channels.
    """
    if not torch.is_tensor(attr) or attr.dim() not in (2, 3) or not attr.is_floating_point():
        raise DreamFlowError(f"interpolate: attr has shape {tuple(getattr(attr, 'shape', ()))}; expected float [N, C] or [V, N, C]")
    if not torch.is_tensor(rast) or rast.dim() != 4 or rast.shape[-1] != 4:
        raise DreamFlowError(f"interpolate: rast has shape {tuple(getattr(rast, 'shape', ()))}; expected [V, H, W, 4] from rasterize()")
    if attr.dim() == 3 and attr.shape[0] not in (1, rast.shape[0]):
        raise DreamFlowError(f"interpolate: attr has {attr.shape[0]} views but rast has {rast.shape[0]}; give [N, C] or one per view")
    if attr.dim() == 3 and attr.shape[0] == 1:
        attr = attr[0]
    tri_in, tri = tri, _check_tri(tri, attr.shape[-2], "interpolate")
    if _resolve(backend, attr, rast) == "cuda":
        dr = backends.nvdiffrast_torch()
        out, _ = dr.interpolate(attr.float().contiguous(), rast.flip(1).float().contiguous(), _tri_int32(tri_in))
        return out.flip(1)
    return _interpolate_torch(attr, rast, tri)


def antialias_topology(tri: Tensor, backend: str = "auto"):
    """Precompute the topology :func:`antialias` needs for a fixed triangle list (optional speed-up).

    Returns nvdiffrast's topology hash for ``"cuda"`` (tri on CUDA), else :func:`triangle_neighbors`.
    """
    if _resolve(backend, tri) == "cuda":
        return backends.nvdiffrast_torch().antialias_construct_topology_hash(_tri_int32(tri))
    return triangle_neighbors(tri)


def antialias(color: Tensor, rast: Tensor, pos_clip: Tensor, tri: Tensor, backend: str = "auto",
              topology=None) -> Tensor:
    """Anti-alias silhouette edges so coverage becomes differentiable in vertex positions.

    Args:
        color: [V, H, W, C] float image to smooth (composited over its background already).
        rast: [V, H, W, 4] from :func:`rasterize` with the same pos_clip / tri.
        pos_clip: [V, N, 4] or [N, 4] clip-space positions used for rasterization.
        tri: [F, 3] triangles.
        backend: as in :func:`rasterize`.
        topology: optional result of :func:`antialias_topology` for this tri and backend.
    Returns:
        [V, H, W, C]: ``color`` with silhouette pixels blended by their analytic edge coverage; gradients flow
        to color and to the silhouette vertices of pos_clip. The torch backend's scheme is described in
        ``_antialias_torch`` (nvdiffrast's differs in detail, e.g. where an edge crosses a pixel corner).
    """
    pos = _as_batched_pos(pos_clip, "antialias")
    tri_in, tri = tri, _check_tri(tri, pos.shape[1], "antialias")
    if color.dim() != 4 or tuple(color.shape[:3]) != tuple(rast.shape[:3]):
        raise DreamFlowError(f"antialias: color {tuple(color.shape)} does not match rast {tuple(rast.shape)}; "
                             f"expected [V, H, W, C] with rast's V, H, W")
    if pos.shape[0] == 1 and rast.shape[0] > 1:
        pos = pos.expand(rast.shape[0], -1, -1)
    if _resolve(backend, color, rast, pos) == "cuda":
        dr = backends.nvdiffrast_torch()
        topo = topology if topology is not None else dr.antialias_construct_topology_hash(_tri_int32(tri_in))
        out = dr.antialias(color.flip(1).float().contiguous(), rast.flip(1).float().contiguous(),
                           pos.float().contiguous(), _tri_int32(tri_in), topology_hash=topo)
        return out.flip(1)
    opp = topology if torch.is_tensor(topology) else triangle_neighbors(tri)
    return _antialias_torch(color, rast, pos, tri, opp.to(tri.device))
