"""An example custom stage for DreamFlow: a ComfyUI node of its own that takes a DreamFlow mesh state, changes it
and returns a new one, so it can sit between any two DreamFlow nodes (see docs/STATES.md).

Install: copy (or link) this folder into ``ComfyUI/custom_nodes/``. It imports nothing from DreamFlow: a state is
used through its public fields (``vertices``, ``faces``, ``history``) and ``clone()``. Headless, the runner loads it
with ``python -m dreamflow.runner WORKFLOW --nodes examples/dreamflow_example_stage``.

The node, ``DreamFlowExampleSmoothMesh``: Taubin smoothing (a shrink step then an inflate step, so the mesh does
not shrink as plain Laplacian smoothing does) of the vertices; faces, colour field and background are kept.
"""

from __future__ import annotations

import torch

MESH = "DREAMFLOW_MESH"  # DreamFlow's mesh state type (docs/STATES.md)


def taubin_smooth(vertices: torch.Tensor, faces: torch.Tensor, iterations: int, strength: float) -> torch.Tensor:
    """Taubin smoothing with uniform weights: per iteration ``v += lam * L(v)`` then ``v += mu * L(v)``, with
    ``lam = strength`` and ``mu = -(strength + 0.03)``; ``L(v)`` = mean of the neighbours minus ``v``."""
    v = vertices.detach().double()
    f = faces.long()
    e = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    e = torch.unique(torch.sort(e, dim=1).values, dim=0)
    i, j = e[:, 0], e[:, 1]
    deg = torch.zeros(len(v), dtype=v.dtype, device=v.device).index_add_(0, e.reshape(-1),
                                                                          torch.ones(e.numel(), dtype=v.dtype,
                                                                                     device=v.device))
    deg = deg.clamp_min(1).unsqueeze(1)

    def lap(x):
        nbr = torch.zeros_like(x).index_add_(0, i, x[j]).index_add_(0, j, x[i])
        return nbr / deg - x

    for _ in range(iterations):
        v = v + strength * lap(v)
        v = v - (strength + 0.03) * lap(v)
    return v.to(vertices.dtype)


class SmoothMesh:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mesh": (MESH, {"tooltip": "A DreamFlow mesh state (any stage's or Load Mesh's 'mesh' output)."}),
            "iterations": ("INT", {"default": 5, "min": 0, "max": 200, "tooltip": "Taubin smoothing passes."}),
            "strength": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05,
                                   "tooltip": "Shrink step of each pass (0: no change)."}),
        }}

    RETURN_TYPES = (MESH,)
    RETURN_NAMES = ("mesh",)
    FUNCTION = "smooth"
    CATEGORY = "DreamFlow/examples"
    DESCRIPTION = "Example custom stage: smooths a DreamFlow mesh's vertices (Taubin), keeping its colour field."

    def smooth(self, mesh, iterations, strength):
        if type(mesh).__name__ != "MeshState":
            raise ValueError(f"SmoothMesh: input 'mesh' is a {type(mesh).__name__}, not a DreamFlow mesh state; "
                             f"connect a DreamFlow 'mesh' output")
        new = mesh.clone()  # never change the input: ComfyUI caches it and other nodes may share it
        new.vertices = taubin_smooth(mesh.vertices, mesh.faces, int(iterations), float(strength))
        new.history = list(mesh.history) + ["ExampleSmoothMesh"]
        return (new,)


NODE_CLASS_MAPPINGS = {"DreamFlowExampleSmoothMesh": SmoothMesh}
NODE_DISPLAY_NAME_MAPPINGS = {"DreamFlowExampleSmoothMesh": "DreamFlow Example: Smooth Mesh"}
