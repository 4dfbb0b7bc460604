"""xatlas in a child process: ``python xatlas_worker.py IN.npz OUT.npz`` (run by path, see ``uv.unwrap_in_worker``).

xatlas' Python binding holds the interpreter lock for the whole unwrap (its times: bench/RESULTS.md, "Figures
moved from docstrings"), which froze a hosting ComfyUI server (HTTP, websocket, Cancel). In a child process the
server's threads keep running, and Cancel can terminate the child. This file imports numpy and xatlas
only, never the ``dreamflow`` package (no torch, so the child starts in a fraction of a second and no
CUDA state is inherited); it is run by path, so ComfyUI's ``main.py`` is not re-imported either (as
``multiprocessing``'s spawn start method would do).

IN.npz holds ``vertices`` [N, 3] float32, ``faces`` [F, 3] uint32, ``texels_per_unit`` and ``padding``
(0-d); OUT.npz gets ``vmapping``, ``faces``, ``uvs``, ``atlas_count``, written to a temporary name and
renamed, so the parent never reads half a file.
"""

from __future__ import annotations

import os
import sys


def unwrap_arrays(vertices, faces, texels_per_unit: float, padding: int):
    """xatlas with a fixed texel density (``resolution = 0``: always one atlas); returns (vmapping, faces, uvs,
    atlas_count) as numpy arrays (vmapping uint32 [M], faces uint32 [F, 3], uvs float32 [M, 2])."""
    import xatlas

    atlas = xatlas.Atlas()
    atlas.add_mesh(vertices, faces)
    pack = xatlas.PackOptions()
    pack.padding = int(padding)
    pack.texels_per_unit = float(texels_per_unit)
    atlas.generate(pack_options=pack)
    count = int(atlas.atlas_count)
    if count != 1:
        return None, None, None, count
    vmapping, faces2, uvs = atlas[0]
    return vmapping, faces2, uvs, count


def main(argv) -> int:
    import numpy as np

    src, dst = argv
    with np.load(src) as data:
        vmapping, faces2, uvs, count = unwrap_arrays(data["vertices"], data["faces"], float(data["texels_per_unit"]),
                                                     int(data["padding"]))
    tmp = dst + ".part.npz"
    if count != 1:
        np.savez(tmp, atlas_count=np.int64(count))
    else:
        np.savez(tmp, vmapping=vmapping, faces=faces2, uvs=uvs, atlas_count=np.int64(count))
    os.replace(tmp, dst)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
