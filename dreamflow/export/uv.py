"""UV atlas: cut a mesh into charts and pack them into one square texture with xatlas.

UV convention (used by every module of ``dreamflow.export``): ``uvs[:, 0] = u`` grows to the right,
``uvs[:, 1] = v`` grows **up**, (0, 0) is the bottom-left corner of the texture image. This is the
OpenGL / OBJ convention that trimesh's ``TextureVisuals`` uses; trimesh writes ``1 - v`` into the
glTF ``TEXCOORD_0`` accessor (whose origin is the top-left), so a texture image stored row 0 = top
(PIL, ComfyUI) lines up. Texel ``(row i, column j)`` of an S x S texture has its centre at
``u = (j + 0.5) / S``, ``v = 1 - (i + 0.5) / S``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch

from ..errors import DreamFlowError, check

log = logging.getLogger("dreamflow")

ArrayLike = Union[np.ndarray, torch.Tensor]

#: Largest texture side accepted, texels: an 8192^2 float32 RGB bake already takes 0.8 GB (choice).
MAX_TEXTURE_SIZE = 8192

#: Fraction of the atlas that xatlas charts typically fill (its ``utilization``, measured on spheres, cubes and
#: marching-cubes meshes: bench/RESULTS.md, "Figures moved from docstrings"). Used to pick texels per world unit so the
#: packed atlas comes out close to the requested resolution.
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
                    return_vmapping: bool = False, worker: bool = False,
                    should_stop: Optional[Callable[[], bool]] = None):
    """:func:`uv_unwrap` on arrays that :func:`check_mesh` returned (``export_glb`` checks the mesh once).

    ``worker``: run xatlas in a child process (:func:`unwrap_in_worker`), so this process's other threads
    keep running and ``should_stop`` can end it; else in this process (xatlas then holds the interpreter
    lock throughout).
    """
    check(16 <= int(resolution) <= MAX_TEXTURE_SIZE, f"uv_unwrap: resolution {resolution} must be in 16..{MAX_TEXTURE_SIZE} texels")
    check(0 <= int(chart_padding) < int(resolution) // 4, f"uv_unwrap: chart_padding {chart_padding} must be in 0..{int(resolution) // 4 - 1} texels")

    tri = v[f]
    area = float(0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1).sum())
    check(area > 0, "uv_unwrap: every face has zero area; the mesh is degenerate")

    # A fixed texel density with ``resolution = 0`` always gives ONE atlas (xatlas' own ``resolution``
    # mode may spill charts into a second atlas whose UVs would overlap the first). The density is chosen
    # so that area * density^2 / utilization ~= resolution^2, i.e. the atlas comes out ~resolution wide.
    texels_per_unit = float(resolution) * math.sqrt(_EXPECTED_UTILIZATION / area)
    v32, f32 = np.ascontiguousarray(v, dtype=np.float32), np.ascontiguousarray(f, dtype=np.uint32)
    if worker:
        vmapping, faces2, uvs, count = unwrap_in_worker(v32, f32, texels_per_unit, int(chart_padding), should_stop)
    else:
        from .xatlas_worker import unwrap_arrays  # xatlas imported there: keeps ComfyUI start-up fast

        vmapping, faces2, uvs, count = unwrap_arrays(v32, f32, texels_per_unit, int(chart_padding))
    if count != 1:  # cannot happen with resolution = 0; guards a future xatlas change
        raise DreamFlowError(f"uv_unwrap: xatlas packed {count} atlases, expected 1; report this with the mesh size ({len(v)} vertices)")
    # xatlas normalises by its atlas width and height (~resolution, not exactly): the UVs fill [0, 1]^2
    # and the charts are stretched by at most a few percent in one direction, harmless for baking.
    vmapping = vmapping.astype(np.int64)
    faces2 = faces2.astype(np.int64).reshape(-1, 3)
    uvs = np.clip(uvs.astype(np.float32), 0.0, 1.0)
    vertices2 = v[vmapping]
    if return_vmapping:
        return vertices2, faces2, uvs, vmapping
    return vertices2, faces2, uvs


#: How often the parent checks the worker and ``should_stop`` while xatlas runs, seconds.
WORKER_POLL_S = 0.05

#: The pid of the last xatlas worker started (tests check that an interrupt leaves no process behind).
last_worker_pid: Optional[int] = None


def worker_limit_s(n_faces: int) -> float:
    """Seconds after which an xatlas worker counts as stalled: a minute plus five milliseconds per face, several
    times the unwrap times recorded in bench/RESULTS.md ("Figures moved from docstrings"). A 12-face cube's worker
    once never returned in a clean-clone CI run (the same call is quick); a stalled worker is ended and the unwrap
    run once more."""
    return 60.0 + 0.005 * int(n_faces)


def unwrap_in_worker(vertices: np.ndarray, faces: np.ndarray, texels_per_unit: float, padding: int,
                     should_stop: Optional[Callable[[], bool]] = None):
    """:func:`unwrap_once` in a child process; a worker that stalls (runs past :func:`worker_limit_s`) is ended
    and the unwrap tried once more; a second stall raises a one-line error."""
    for attempt in (1, 2):
        out = unwrap_once(vertices, faces, texels_per_unit, padding, should_stop, worker_limit_s(len(faces)))
        if out is not None:
            return out
        log.warning("uv_unwrap: the xatlas worker stalled (attempt %d, %d faces)", attempt, len(faces))
    raise DreamFlowError(f"uv_unwrap: the xatlas worker stalled twice ({len(faces)} faces, over "
                         f"{worker_limit_s(len(faces)):.0f} seconds each); lower ExtractMesh's face_budget or check xatlas")


def unwrap_once(vertices: np.ndarray, faces: np.ndarray, texels_per_unit: float, padding: int,
                should_stop: Optional[Callable[[], bool]] = None, limit_s: float = float("inf")):
    """Run ``xatlas_worker.unwrap_arrays`` in a child Python process; returns its (vmapping, faces, uvs, atlas_count).

    The child is this interpreter (``sys.executable``) running ``xatlas_worker.py`` by path: it imports numpy and
    xatlas only (no torch, no CUDA state, not ComfyUI's ``main.py`` as ``multiprocessing`` spawn would), and
    gets plain arrays through a temporary ``.npz``. While it runs, this thread sleeps in ``WORKER_POLL_S`` steps
    (the interpreter lock stays free for the server) and polls ``should_stop``; when that returns True the
    child is terminated (killed after 5 s), its temporary folder removed, and the interrupt raised
    (:func:`dreamflow.hosting.raise_interrupt`: ComfyUI's own exception when hosted). Nothing is written
    anywhere else. A child still running after ``limit_s`` is ended the same way and None returned (a stall).
    """
    import shutil
    import subprocess
    import sys
    import tempfile

    from .. import hosting

    global last_worker_pid
    tmp = tempfile.mkdtemp(prefix="dreamflow_xatlas_")
    try:
        src, dst, log = (os.path.join(tmp, n) for n in ("in.npz", "out.npz", "stderr.txt"))
        np.savez(src, vertices=vertices, faces=faces, texels_per_unit=np.float64(texels_per_unit),
                 padding=np.int64(padding))
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "xatlas_worker.py")
        with open(log, "wb") as err:
            proc = subprocess.Popen([sys.executable, script, src, dst], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err, cwd=tmp)
        last_worker_pid = proc.pid
        deadline, stalled = time.monotonic() + limit_s, False
        try:
            while proc.poll() is None:
                if should_stop is not None and should_stop():
                    break
                if time.monotonic() > deadline:
                    stalled = True
                    break
                time.sleep(WORKER_POLL_S)
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if proc.returncode != 0 and should_stop is not None and should_stop():
            hosting.raise_interrupt("interrupted while unwrapping the UV atlas; nothing was written")
        if stalled:
            return None
        if proc.returncode != 0 or not os.path.isfile(dst):
            with open(log, "rb") as f:
                lines = f.read().decode("utf-8", "replace").strip().splitlines()
            how = (f"crashed (signal {-proc.returncode})" if proc.returncode < 0
                   else f"failed (exit code {proc.returncode})")
            raise DreamFlowError(f"uv_unwrap: the xatlas worker process {how}: {lines[-1] if lines else 'no message'}"
                                 f" ({len(faces)} faces); check that xatlas is installed in {sys.executable}, or "
                                 f"lower ExtractMesh's face_budget")
        with np.load(dst) as out:
            count = int(out["atlas_count"])
            if count != 1:
                return None, None, None, count
            return out["vmapping"], out["faces"], out["uvs"], count
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
