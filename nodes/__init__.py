"""DreamFlow's ComfyUI nodes. One ``NODE_CONFIG`` dict yields ``NODE_CLASS_MAPPINGS`` and
``NODE_DISPLAY_NAME_MAPPINGS``; each node lives in its own module and is imported on its own, so a
node whose import fails (e.g. a missing optional dependency) is logged and skipped, not the pack.
"""

from __future__ import annotations

import importlib
import logging

log = logging.getLogger("dreamflow")

#: node id -> (module in this package, class name, display name)
NODE_CONFIG = {
    "DreamFlowLoadDenoiser": ("load_denoiser", "LoadDenoiser", "DreamFlow Load Denoiser"),
    "DreamFlowNeRFStage": ("nerf_stage", "NeRFStage", "DreamFlow NeRF Stage"),
    "DreamFlowExtractMesh": ("extract_mesh", "ExtractMesh", "DreamFlow Extract Mesh"),
    "DreamFlowMeshStage": ("mesh_stage", "MeshStage", "DreamFlow Mesh Stage"),
    "DreamFlowSDXLRefine": ("sdxl_refine", "SDXLRefine", "DreamFlow SDXL Refine"),
    "DreamFlowSaveGLB": ("save_glb", "SaveGLB", "DreamFlow Save GLB"),
    "DreamFlowSaveState": ("state_files", "SaveState", "DreamFlow Save State"),
    "DreamFlowLoadState": ("state_files", "LoadState", "DreamFlow Load State"),
    "DreamFlowLoadMesh": ("mesh_io", "LoadMesh", "DreamFlow Load Mesh"),
    "DreamFlowMeshToCoreMesh": ("mesh_io", "MeshToCoreMesh", "DreamFlow Mesh to MESH"),
    "DreamFlowCoreMeshToMesh": ("mesh_io", "CoreMeshToMesh", "DreamFlow MESH to Mesh"),
    "DreamFlowMeshToTrimesh": ("mesh_io", "MeshToTrimesh", "DreamFlow Mesh to TRIMESH"),
    "DreamFlowTrimeshToMesh": ("mesh_io", "TrimeshToMesh", "DreamFlow TRIMESH to Mesh"),
}

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
UNAVAILABLE = {}
"""node id -> why it could not be imported (also logged as a warning)."""

for _node_id, (_module, _cls, _name) in NODE_CONFIG.items():
    try:
        NODE_CLASS_MAPPINGS[_node_id] = getattr(importlib.import_module(f".{_module}", __name__), _cls)
        NODE_DISPLAY_NAME_MAPPINGS[_node_id] = _name
    except Exception as _e:  # one broken node must not take the pack down
        UNAVAILABLE[_node_id] = f"{type(_e).__name__}: {_e}"
        log.warning("DreamFlow: node %s is unavailable (%s)", _node_id, UNAVAILABLE[_node_id])
