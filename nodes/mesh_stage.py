"""DreamFlowMeshStage: stage 2, the mesh's geometry and texture fine-tuned by APFO under SD 1.x/2.x."""

from __future__ import annotations

from dreamflow import hosting
from dreamflow.stages import MeshStageConfig, run_mesh_stage

from .common import (CATEGORY, DENOISER, MESH, denoise_resolution_input, engine_call, guidance_changes,
                     guidance_inputs, int_input, make_config, mesh_changes, mesh_inputs, preview_inputs,
                     prompt_override_inputs, seed_input, to_image)


class MeshStage:
    @classmethod
    def INPUT_TYPES(cls):
        c = MeshStageConfig()
        return {
            "required": {
                "denoiser": (DENOISER, {"tooltip": "An SD 1.x/2.x denoiser (paper: SD 2.1, as in the NeRF stage)."}),
                "mesh": (MESH, {"tooltip": "The mesh to fine-tune (ExtractMesh's output or a loaded mesh state)."}),
                **prompt_override_inputs(),
                "seed": seed_input(c),
                "iterations": int_input(c, "iterations", 1, 100000, "Optimisation updates of the mesh."),
                "resolution": int_input(c, "resolution", 16, 2048, "Rasterised image size, pixels (paper stage 2: "
                                        "512).", step=16),
                "denoise_resolution": denoise_resolution_input(c),
                "views_per_update": int_input(c, "views_per_update", 1, 64, "Random cameras per update."),
                **guidance_inputs(c),
                **mesh_inputs(c),
                **preview_inputs(),
            }
        }

    RETURN_TYPES = (MESH, "IMAGE")
    RETURN_NAMES = ("mesh", "preview")
    OUTPUT_TOOLTIPS = ("The fine-tuned textured mesh, for SDXL refine or Save GLB.",
                       "Turntable renders of the mesh, [views, H, W, 3].")
    FUNCTION = "run"
    CATEGORY = f"{CATEGORY}/stages"
    DESCRIPTION = ("Stage 2 of DreamFlow: fine-tunes the extracted mesh's vertices (bounded offsets) and colour "
                   "field with a differentiable rasterizer under APFO (or SDS/VSD), at 512 px.")

    def run(self, denoiser, mesh, prompt, negative_prompt, seed, iterations, resolution, denoise_resolution,
            views_per_update, method, cfg_scale, t_start, t_end, updates_per_t, lr_geometry, lr_grid, lr_mlp,
            lr_lora, lambda_normal_consistency, lambda_laplacian, preview_views, preview_resolution):
        config = make_config(MeshStageConfig, seed=seed, iterations=iterations, resolution=resolution,
                             denoise_resolution=denoise_resolution, views_per_update=views_per_update,
                             **mesh_changes(lr_geometry, lr_grid, lr_mlp, lambda_normal_consistency, lambda_laplacian),
                             **guidance_changes(method, cfg_scale, t_start, t_end, updates_per_t, lr_lora))
        with engine_call():
            state = run_mesh_stage(denoiser, mesh, prompt, negative_prompt, config,
                                   callbacks=hosting.comfy_progress(config.iterations))
            preview = state.turntable(preview_views, preview_resolution)
        return (state, to_image(preview))
