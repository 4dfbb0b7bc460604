"""Multiresolution hash grid (Instant-NGP, Mueller et al. 2022) with tiny-cuda-nn's exact semantics.

Two backends share one parameter tensor (same layout as tiny-cuda-nn's ``GridEncoding``, so a state
saved with one loads into the other):

* ``torch``: pure PyTorch, runs anywhere, vectorised over points *and* levels (no Python loop over
  points, no data-dependent Python branches: ``torch.compile(fullgraph=True)`` traces it);
* ``cuda``: ``tinycudann.Encoding`` (picked by :func:`dreamflow.backends.pick`).

tiny-cuda-nn semantics (``include/tiny-cuda-nn/encodings/grid.h``), per level ``l``:

* ``scale_l = base_resolution * per_level_scale**l - 1`` (float32, as tcnn: "scale minus 1");
* ``resolution_l = ceil(scale_l) + 1``;
* ``pos = x * scale_l + 0.5``; corner ``floor(pos) + {0,1}^3``; trilinear weights from ``pos - floor(pos)``;
* entries in the level ``T_l = min(next_multiple(resolution_l^3, 8), 2^log2_hashmap_size)``;
* index: dense ``x + y*res + z*res^2`` while ``res^3 <= T_l``, else the coherent prime hash
  ``x*1 XOR y*2654435761 XOR z*805459861`` (uint32 arithmetic); then ``mod T_l``;
* table layout: ``params[(offset_l + index) * F + f]``; init U(-1e-4, 1e-4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..errors import check

#: tiny-cuda-nn's primes for the coherent spatial hash (``fast_hash`` in grid.h), one per dimension.
HASH_PRIMES = (1, 2654435761, 805459861)
_UINT32 = 0xFFFFFFFF


@dataclass
class HashGridConfig:
    """Hash grid encoding (defaults: threestudio ``configs/prolificdreamer.yaml``, max resolution 4096)."""

    n_levels: int = 16
    """Number of resolution levels L (threestudio prolificdreamer)."""
    n_features_per_level: int = 2
    """Features per level F; output width is L * F (threestudio; tcnn allows 1, 2, 4, 8)."""
    log2_hashmap_size: int = 19
    """log2 of the entries per hashed level T (threestudio prolificdreamer)."""
    base_resolution: int = 16
    """Coarsest level's base resolution (threestudio prolificdreamer)."""
    per_level_scale: float = 1.447269237440378
    """Growth factor between levels; 16 * 1.4473^15 = 4096 (threestudio prolificdreamer)."""
    backend: str = "auto"
    """"auto" (tcnn when installed with CUDA, else torch), "torch" or "cuda" (see dreamflow/backends.py)."""
    compile: bool = True
    """On CUDA, run the torch path through ``torch.compile`` (fuses the gather / interpolation: much faster, at a
    one-off compile on the first call; bench/RESULTS.md, "Figures moved from
    docstrings"). CPU inputs always run eagerly (compiling needs a
    C++ toolchain and takes longer than a CPU stage gains)."""

    def validate(self) -> "HashGridConfig":
        check(1 <= self.n_levels <= 32, f"hash grid n_levels={self.n_levels} is out of range; use 1..32 (tiny-cuda-nn's limit)")
        check(self.n_features_per_level in (1, 2, 4, 8),
              f"hash grid n_features_per_level={self.n_features_per_level} is unsupported; use one of 1, 2, 4, 8 (tiny-cuda-nn)")
        check(4 <= self.log2_hashmap_size <= 30, f"hash grid log2_hashmap_size={self.log2_hashmap_size} is out of range; use 4..30 (19 is usual)")
        check(self.base_resolution >= 2, f"hash grid base_resolution={self.base_resolution} must be >= 2 (16 is usual)")
        check(self.per_level_scale >= 1.0, f"hash grid per_level_scale={self.per_level_scale} must be >= 1 (1.447 is usual)")
        check(self.backend in ("auto", "torch", "cuda"), f"hash grid backend '{self.backend}' is unknown; use one of: auto, torch, cuda")
        return self

    @property
    def n_output_dims(self) -> int:
        return self.n_levels * self.n_features_per_level

    def tcnn_config(self) -> dict:
        """The equivalent tiny-cuda-nn encoding config (``otype`` HashGrid, linear interpolation)."""
        return {"otype": "HashGrid", "n_levels": self.n_levels, "n_features_per_level": self.n_features_per_level,
                "log2_hashmap_size": self.log2_hashmap_size, "base_resolution": self.base_resolution,
                "per_level_scale": self.per_level_scale, "interpolation": "Linear"}


def level_layout(cfg: HashGridConfig):
    """Per-level tcnn bookkeeping, computed in float32 exactly as ``GridEncodingTemplated``'s constructor.

    Returns:
        dict of numpy arrays, each [L]: ``scale`` (float32), ``resolution`` (int64), ``size`` (entries T_l,
        int64), ``offset`` (first entry of the level, int64), ``hashed`` (bool); and ``total`` (int) entries.
    """
    L = cfg.n_levels
    log2_pls = np.log2(np.float32(cfg.per_level_scale), dtype=np.float32)
    scale = (np.exp2(np.arange(L, dtype=np.float32) * log2_pls, dtype=np.float32)
             * np.float32(cfg.base_resolution) - np.float32(1.0)).astype(np.float32)
    resolution = np.ceil(scale).astype(np.int64) + 1
    dense = resolution.astype(np.float64) ** 3
    max_params = float(np.iinfo(np.uint32).max // 2)
    size = np.where(dense > max_params, int(max_params), resolution ** 3).astype(np.int64)
    size = (size + 7) // 8 * 8  # tcnn aligns each level to 8 entries
    size = np.minimum(size, 1 << cfg.log2_hashmap_size)
    hashed = resolution.astype(np.float64) ** 3 > size
    offset = np.concatenate([[0], np.cumsum(size)[:-1]]).astype(np.int64)
    return {"scale": scale, "resolution": resolution, "size": size, "offset": offset, "hashed": hashed,
            "total": int(size.sum())}


LevelSpec = Tuple[int, int, int, bool]  # (resolution, entries T_l, offset, hashed), Python ints: static per config


def grid_corners(x: torch.Tensor, scale: torch.Tensor, levels: Sequence[LevelSpec]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Table rows and trilinear weights of the 8 cell corners of each point at each level (tcnn semantics).

    Only the integer index maths loops over the (<= 32) levels, branching on each level's *static* kind
    (dense or hashed, fixed by the config), so ``torch.compile(fullgraph=True)`` traces it and each level does
    only the arithmetic it needs (faster on CPU than computing both kinds for every level: bench/RESULTS.md,
    "Figures moved from docstrings").

    Args: x [N, 3] float32 in [0, 1]; scale [L] float32; levels: L tuples from :func:`level_specs`.
    Returns: ``index`` [N, L, 8] int64 rows of the [total, F] table, ``w`` [N, L, 8] weights (float32,
        differentiable in x: d frac / dx = scale, tcnn's dy_dx).
    """
    N, L = x.shape[0], scale.shape[0]
    pos = x[:, None, :] * scale[None, :, None] + 0.5  # [N, L, 3]
    pos_floor = torch.floor(pos)
    frac = pos - pos_floor
    grid = pos_floor.to(torch.int64)
    # Corner quantities separate per dimension: build [N, 2] tables (bit 0 / 1 of that dimension) and
    # combine them by broadcasting to [N, 2(z), 2(y), 2(x)]; flattened, corner c = 4 b_z + 2 b_y + b_x
    # is tcnn's loop order (bit d of c set -> +1 along dim d).
    step = torch.arange(2, device=x.device, dtype=torch.int64)
    indices = []
    for l, (res, size, offset, hashed) in enumerate(levels):
        cx, cy, cz = (grid[:, l, d, None] + step for d in range(3))  # [N, 2] corner coordinates
        if hashed:
            # uint32 products (tcnn fast_hash); T_l = 2^log2_hashmap_size here, so mod is a mask
            hy, hz = (cy * HASH_PRIMES[1]) & _UINT32, (cz * HASH_PRIMES[2]) & _UINT32
            index = ((cx[:, None, None, :] * HASH_PRIMES[0]) ^ hy[:, None, :, None] ^ hz[:, :, None, None]) & (size - 1)
        else:
            index = cx[:, None, None, :] + cy[:, None, :, None] * res + cz[:, :, None, None] * (res * res)
            # a corner may sit one past the grid (as in tcnn); such indices are < 2 T_l, so one
            # conditional subtraction is tcnn's ``index % T_l``
            index = torch.where(index >= size, index - size, index)
        indices.append((index + offset).reshape(N, 8))
    index = torch.stack(indices, dim=1)  # [N, L, 8]
    # trilinear weights prod_d (frac_d if bit else 1 - frac_d), same broadcast
    wx, wy, wz = (torch.stack([1 - frac[:, :, d], frac[:, :, d]], dim=-1) for d in range(3))  # [N, L, 2]
    w = (wx[:, :, None, None, :] * wy[:, :, None, :, None]) * wz[:, :, :, None, None]  # [N, L, 2, 2, 2]
    return index, w.reshape(N, L, 8)


def hash_grid_torch(x: torch.Tensor, table: torch.Tensor, scale: torch.Tensor,
                    levels: Sequence[LevelSpec]) -> torch.Tensor:
    """Encode points with the hash grid in plain torch (vectorised over points and levels).

    Args:
        x: [N, 3] float32 in [0, 1] (clamped by the caller).
        table: [total, F] float parameters (tcnn layout).
        scale: [L] float32 per-level scales; levels: L tuples from :func:`level_specs`.
    Returns:
        [N, L * F] features, level-major (columns l*F .. l*F+F-1 belong to level l), dtype of ``table``.
    """
    N, L = x.shape[0], scale.shape[0]
    index, w = grid_corners(x, scale, levels)
    # index_select's backward (index_add) is faster on CPU than embedding's (bench/RESULTS.md, "Figures moved
    # from docstrings")
    feats = table.index_select(0, index.reshape(-1)).view(N, L, 8, table.shape[1])  # [N, L, 8, F]
    out = (w[..., None].to(feats.dtype) * feats).sum(dim=2)  # [N, L, F]
    return out.reshape(N, L * table.shape[1])


def hash_grid_table_grad(x: torch.Tensor, grad_out: torch.Tensor, scale: torch.Tensor,
                         levels: Sequence[LevelSpec], total: int, n_features: int) -> torch.Tensor:
    """The gradient of :func:`hash_grid_torch`'s output w.r.t. the table, recomputing the corners from ``x``.

    ``grad_table[index[n, l, c]] += w[n, l, c] * grad_out[n, l]`` (what autograd's index_add computes, without
    keeping index / w alive between the forward and the backward). Returns [total, F] in ``grad_out.dtype``.
    """
    N, L = x.shape[0], scale.shape[0]
    index, w = grid_corners(x, scale, levels)
    vals = w[..., None].to(grad_out.dtype) * grad_out.reshape(N, L, 1, n_features)  # [N, L, 8, F]
    grad = torch.zeros(total, n_features, device=grad_out.device, dtype=grad_out.dtype)
    return grad.index_add_(0, index.reshape(-1), vals.reshape(-1, n_features))


class _RecomputedGrid(torch.autograd.Function):
    """Hash grid encoding whose backward recomputes the corner indices and weights from the saved points.

    Autograd through :func:`hash_grid_torch` keeps ``index`` (int64) and ``w`` for every point, level and corner
    -- 16 levels x 8 corners x 12 bytes ~ 1.5 KB per point, gigabytes at a NeRF stage's millions of samples.
    Here only the points are kept (12 bytes each), as tiny-cuda-nn does. For inputs that do not need gradients
    (ray samples); the table's gradient is the only one returned.
    """

    @staticmethod
    def forward(ctx, x, table, scale, levels, encode, table_grad):
        ctx.save_for_backward(x, scale)
        ctx.levels, ctx.table_grad, ctx.table_shape = levels, table_grad, tuple(table.shape)
        return encode(x, table, scale, levels)

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[1]:
            return None, None, None, None, None, None
        x, scale = ctx.saved_tensors
        total, n_features = ctx.table_shape
        grad = ctx.table_grad(x, grad_out.contiguous(), scale, ctx.levels, total, n_features)
        return None, grad, None, None, None, None


def level_specs(cfg: HashGridConfig) -> Tuple[LevelSpec, ...]:
    """Per-level (resolution, T_l, offset, hashed) as Python values, from :func:`level_layout`."""
    lay = level_layout(cfg)
    return tuple((int(r), int(s), int(o), bool(h)) for r, s, o, h in
                 zip(lay["resolution"], lay["size"], lay["offset"], lay["hashed"]))


class HashGrid(nn.Module):
    """Hash grid encoding: [N, 3] in [0, 1] -> [N, L * F].

    Inputs outside [0, 1] are clamped (tcnn leaves them undefined). ``params`` ([total * F], float32)
    is the only parameter, in tcnn's layout, whichever backend runs.
    """

    def __init__(self, config: Optional[HashGridConfig] = None, generator: Optional[torch.Generator] = None):
        super().__init__()
        from ..backends import pick

        self.config = cfg = (config or HashGridConfig()).validate()
        layout = level_layout(cfg)
        self.n_output_dims = cfg.n_output_dims
        self.total_entries = layout["total"]
        F_ = cfg.n_features_per_level
        init = (torch.rand(layout["total"] * F_, generator=generator) * 2 - 1) * 1e-4  # tcnn: U(-1e-4, 1e-4)
        self.params = nn.Parameter(init)
        self.register_buffer("scale", torch.from_numpy(layout["scale"]), persistent=False)
        self.levels = level_specs(cfg)
        self.backend = pick("hashgrid", cfg.backend)
        self._tcnn = None  # built on the first CUDA forward (native objects neither copy nor pickle)
        self._compiled = None  # compiled (hash_grid_torch, hash_grid_table_grad), made on the first CUDA forward

    def _make_tcnn(self):
        from ..backends import tinycudann

        tcnn = tinycudann()
        enc = tcnn.Encoding(3, self.config.tcnn_config(), dtype=torch.float32)
        if enc.params.numel() != self.params.numel():  # layouts must agree for states to be portable
            raise RuntimeError(f"tiny-cuda-nn grid has {enc.params.numel()} params, expected {self.params.numel()}")
        # share our Parameter so optimisers and state dicts see one tensor; keep enc out of the module tree
        enc.params = self.params
        return enc

    @property
    def table(self) -> torch.Tensor:
        """[total_entries, F] view of the parameters."""
        return self.params.view(self.total_entries, self.config.n_features_per_level)

    def forward(self, x: torch.Tensor, twice_differentiable: bool = False) -> torch.Tensor:
        """Args: x [N, 3] float in [0, 1]; ``twice_differentiable``: the caller will differentiate a gradient of
        the output (analytic normals inside a loss: ``autograd.grad(..., create_graph=True)``), which a compiled
        function's backward does not support, so the torch path then runs uncompiled.
        Returns: [N, L * F] float32 (differentiable in x and params).

        When ``x`` needs no gradient (ray samples) and the table does, the torch path keeps only ``x`` for the
        backward and recomputes the corners there (:class:`_RecomputedGrid`); otherwise (analytic normals, mesh
        positions) autograd differentiates :func:`hash_grid_torch` itself.
        """
        x = x.float().clamp(0.0, 1.0)
        if self.backend == "cuda" and x.is_cuda:
            if self._tcnn is None:
                self._tcnn = self._make_tcnn()
            return self._tcnn(x).float()
        encode, table_grad = hash_grid_torch, hash_grid_table_grad
        if self.config.compile and x.is_cuda and not twice_differentiable:
            if self._compiled is None:
                from ..compile_cache import use_persistent_compile_cache

                use_persistent_compile_cache()  # before the first compile: kernels kept between reboots
                self._compiled = (torch.compile(hash_grid_torch, dynamic=True),
                                  torch.compile(hash_grid_table_grad, dynamic=True))
            encode, table_grad = self._compiled
        if torch.is_grad_enabled() and self.params.requires_grad and not x.requires_grad:
            return _RecomputedGrid.apply(x, self.table, self.scale, self.levels, encode, table_grad)
        return encode(x, self.table, self.scale, self.levels)

    def __getstate__(self):
        # deepcopy / pickle: drop the native tcnn module; the copy rebuilds it around its own params
        state = self.__dict__.copy()
        state["_tcnn"] = None
        return state

    def __setattr__(self, name, value):
        # keep the tcnn module (which holds our Parameter) out of state_dict / parameters()
        if name == "_tcnn":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)
