"""Stages: NeRFStage (1), ExtractMesh, MeshStage (2), SDXLRefine (3); each returns a typed state."""

from .extract import ExtractConfig, extract_mesh
from .mesh_stage import MeshStageConfig, RefineConfig, extract_mesh_state, run_mesh_stage, run_refine_stage
from .nerf_stage import NeRFStageConfig, run_nerf_stage

__all__ = ["ExtractConfig", "extract_mesh", "extract_mesh_state", "MeshStageConfig", "RefineConfig",
           "run_mesh_stage", "run_refine_stage", "NeRFStageConfig", "run_nerf_stage"]
