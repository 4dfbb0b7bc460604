"""DreamFlowSDXLRefine: stage 3, the texture (and optionally geometry) refined under the SDXL refiner."""

from __future__ import annotations

from dreamflow import hosting
from dreamflow.stages import RefineConfig, run_refine_stage

from .common import (CATEGORY, DENOISER, MESH, denoise_resolution_input, engine_call, guidance_changes,
                     guidance_inputs, int_input, make_config, mesh_changes, mesh_inputs, preview_inputs,
                     prompt_override_inputs, seed_input, to_image)


class SDXLRefine:
    @classmethod
    def INPUT_TYPES(cls):
        c = RefineConfig()
        return {
            "required": {
                "refiner": (DENOISER, {"tooltip": "The SDXL refiner from DreamFlow Load Denoiser "
                                                  "(sd_xl_refiner_1.0)."}),
                "mesh": (MESH, {"tooltip": "The mesh to refine (the mesh stage's output)."}),
                **prompt_override_inputs(),
                "seed": seed_input(c),
                "iterations": int_input(c, "iterations", 1, 100000, "Optimisation updates of the refinement."),
                "resolution": int_input(c, "resolution", 16, 2048, "Rasterised image size, pixels (paper stage 3 "
                                        "and the refiner's native size: 1024).", step=16),
                "denoise_resolution": denoise_resolution_input(c),
                "views_per_update": int_input(c, "views_per_update", 1, 64, "Random cameras per update."),
                **guidance_inputs(c),
                "refine_geometry": ("BOOLEAN", {"default": bool(c.optimize_geometry),
                                                "tooltip": "Also move the vertices (off, the paper's setting: "
                                                           "texture only, the mesh stage's geometry is kept)."}),
                **mesh_inputs(c),
                **preview_inputs(),
            }
        }

    RETURN_TYPES = (MESH, "IMAGE")
    RETURN_NAMES = ("mesh", "preview")
    OUTPUT_TOOLTIPS = ("The refined textured mesh, for Save GLB.", "Turntable renders of the mesh, [views, H, W, 3].")
    FUNCTION = "run"
    CATEGORY = f"{CATEGORY}/stages"
    DESCRIPTION = ("Stage 3 of DreamFlow: refines the mesh's texture at 1024 px under the SDXL refiner with APFO's "
                   "low-noise schedule (t 0.3 -> 0); optionally the geometry too.")

    def run(self, refiner, mesh, prompt, negative_prompt, seed, iterations, resolution, denoise_resolution,
            views_per_update, method, cfg_scale, t_start, t_end, updates_per_t, refine_geometry, lr_geometry,
            lr_grid, lr_mlp, lr_lora, lambda_normal_consistency, lambda_laplacian, preview_views,
            preview_resolution):
        config = make_config(RefineConfig, seed=seed, iterations=iterations, resolution=resolution,
                             denoise_resolution=denoise_resolution, views_per_update=views_per_update,
                             optimize_geometry=bool(refine_geometry),
                             **mesh_changes(lr_geometry, lr_grid, lr_mlp, lambda_normal_consistency, lambda_laplacian),
                             **guidance_changes(method, cfg_scale, t_start, t_end, updates_per_t, lr_lora))
        with engine_call():
            state = run_refine_stage(refiner, mesh, prompt, negative_prompt, config,
                                     callbacks=hosting.comfy_progress(config.iterations))
            preview = state.turntable(preview_views, preview_resolution)
        return (state, to_image(preview))
