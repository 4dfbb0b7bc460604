"""The offline demo's settings (:class:`DemoConfig`) and the one table that maps them to the toy workflow's
widgets (:func:`widget_values`).

Both the demo (``dreamflow/demo.py``: ``--set`` edits of the workflow it runs) and the workflow generator
(``dreamflow/runner/build.py``: ``workflows/dreamflow_toy_demo.json``) read the table, so the two cannot drift.
It lives here, below both of them, so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict


@dataclass
class DemoConfig:
    """Demo settings, chosen to finish in <= 5 min on 2 CPU cores (timings: bench/RESULTS.md, "Toy demo on CPU")."""

    threads: int = 1
    """torch CPU threads. 1: the demo's small tensors gain little from more, and threads of a busy machine
    contend: a busy 2-core machine ran NeRF updates several times slower with 2 threads than with 1
    (bench/RESULTS.md, "Figures moved from docstrings")."""
    model: str = "dreamflow-toy"
    """Denoiser name (the shipped toy prior, 64 px native)."""
    seed: int = 0
    """Seed of both stages."""
    nerf_iterations: int = 200
    """NeRF-stage updates (APFO t 1.0 -> 0.2 over them)."""
    nerf_views: int = 2
    """Views per NeRF update."""
    nerf_resolution: int = 48
    """NeRF render size, px (resized to the prior's 64 px before encoding)."""
    n_samples: int = 32
    """Stratified samples per ray (threestudio uses 512 at 256 px; 32 + 32 suffices for the toy objects)."""
    n_importance: int = 32
    """Importance samples per ray."""
    hash_levels: int = 8
    """Hash-grid levels (max resolution 16 * 1.4473^7 ~ 214 cells across: plenty for 48 px renders)."""
    hash_log2_size: int = 15
    """log2 entries per hashed level (small table: fast CPU updates)."""
    lr_grid: float = 3e-2
    """Hash-grid lr (threestudio's 1e-2 is for 25k updates; short runs need larger steps)."""
    lr_mlp: float = 1e-2
    """Density / albedo MLP lr (threestudio 1e-3 leaves the albedo grey over a short run)."""
    cfg_scale: float = 7.5
    """Classifier-free guidance of the prior (threestudio VSD value)."""
    lora_lr: float = 1e-2
    """Scene-LoRA Adam lr of both stages (threestudio's 1e-4 is for 25k updates: over 200 updates the LoRA barely
    follows the scene, and APFO's step is then mostly the CFG direction). 1e-2 was the best of 1e-4 / 1e-3 / 1e-2
    for APFO and VSD alike in the GLB fidelity sweep (bench/RESULTS.md, "The LoRA learning rate on the device")."""
    extract_resolution: int = 64
    """Marching-cubes grid per axis."""
    face_budget: int = 4000
    """Faces kept after decimation."""
    mesh_iterations: int = 30
    """Mesh-stage updates (APFO t 0.5 -> 0.1)."""
    mesh_resolution: int = 64
    """Mesh-stage render size, px."""
    texture_size: int = 256
    """Baked texture side, texels."""
    turntable_views: int = 8
    """Views in the turntable PNG."""
    turntable_resolution: int = 128
    """Side of each turntable view, px."""


def widget_values(cfg: DemoConfig, prompt: str) -> Dict[str, Dict[str, object]]:
    """Node id -> {widget: value} that make the toy workflow run ``cfg`` on ``prompt`` (the one mapping of
    :class:`DemoConfig` to widgets; ``demo.stage_configs`` builds the same stage configs directly). The stages'
    cameras span the toy prior's training elevations (``world.TOY_CAMERA``)."""
    from .world import TOY_CAMERA

    camera = dict(zip(("elevation_min", "elevation_max"), TOY_CAMERA.elevation_range))
    return {
        "DreamFlowNeRFStage": dict(prompt=prompt, seed=cfg.seed, iterations=cfg.nerf_iterations,
                                   resolution=cfg.nerf_resolution, denoise_resolution=64,
                                   views_per_update=cfg.nerf_views, method="apfo", cfg_scale=cfg.cfg_scale,
                                   t_start=1.0, t_end=0.2, lr_grid=cfg.lr_grid, lr_mlp=cfg.lr_mlp, lr_lora=cfg.lora_lr,
                                   grid_levels=cfg.hash_levels, grid_log2_size=cfg.hash_log2_size,
                                   n_samples=cfg.n_samples, n_importance=cfg.n_importance, **camera),
        "DreamFlowExtractMesh": dict(resolution=cfg.extract_resolution, face_budget=cfg.face_budget),
        # MeshStage's prompt stays empty: it takes the one the mesh state carries from the NeRF stage
        "DreamFlowMeshStage": dict(seed=cfg.seed, iterations=cfg.mesh_iterations,
                                   resolution=cfg.mesh_resolution, denoise_resolution=64,
                                   views_per_update=cfg.nerf_views, method="apfo", cfg_scale=cfg.cfg_scale,
                                   t_start=0.5, t_end=0.1, lr_lora=cfg.lora_lr, **camera),
        "DreamFlowSaveGLB": dict(texture_size=cfg.texture_size, turntable_views=cfg.turntable_views,
                                 turntable_resolution=cfg.turntable_resolution),
    }
