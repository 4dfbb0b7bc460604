"""DreamFlowSDXLRefine: stage 3, the texture (and optionally geometry) refined under the SDXL refiner."""

from __future__ import annotations

from dreamflow import hosting
from dreamflow.stages import RefineConfig, run_refine_stage

from .common import (CATEGORY, DENOISER, MESH, Checked, check_prompt_value, denoise_resolution_input, engine_call,
                     guidance_changes, guidance_inputs, int_input, known, make_config, mesh_changes, mesh_inputs,
                     preview_inputs, prompt_inputs, seed_input, to_image)
from .mesh_stage import CONFIG_INPUTS as MESH_CONFIG_INPUTS
from .mesh_stage import MEMORY_HINT

NODE = "DreamFlowSDXLRefine"
CONFIG_INPUTS = MESH_CONFIG_INPUTS + ("refine_geometry",)


class SDXLRefine(Checked):
    node_name = NODE

    @classmethod
    def INPUT_TYPES(cls):
        c = RefineConfig()
        return {
            "required": {
                "refiner": (DENOISER, {"tooltip": "The SDXL refiner from DreamFlow Load Denoiser "
                                                  "(sd_xl_refiner_1.0)."}),
                "mesh": (MESH, {"tooltip": "The mesh to refine (the mesh stage's output)."}),
                **prompt_inputs("A corgi standing up drinking boba."),
                "seed": seed_input(c),
                "iterations": int_input(c, "iterations", 1, 100000, "Optimisation updates of the refinement."),
                "resolution": int_input(c, "resolution", 16, 2048, "Rasterised image size, pixels (paper stage 3 "
                                        "and the refiner's native size: 1024).", step=16),
                "denoise_resolution": denoise_resolution_input(c),
                "views_per_update": int_input(c, "views_per_update", 1, 64, "Random cameras per update."),
                **guidance_inputs(c),
                "refine_geometry": ("BOOLEAN", {"default": bool(c.optimize_geometry),
                                                "tooltip": "Also move the vertices. Off (the paper's setting): "
                                                           "texture only, the vertices stay bit-identical."}),
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

    @classmethod
    def build_config(cls, seed, iterations, resolution, denoise_resolution, views_per_update, method, cfg_scale,
                     t_start, t_end, updates_per_t, refine_geometry, lr_geometry, lr_grid, lr_mlp, lr_lora,
                     lambda_normal_consistency, lambda_laplacian, **_):
        return make_config(RefineConfig, seed=seed, iterations=iterations, resolution=resolution,
                           denoise_resolution=denoise_resolution, views_per_update=views_per_update,
                           optimize_geometry=bool(refine_geometry),
                           **mesh_changes(lr_geometry, lr_grid, lr_mlp, lambda_normal_consistency, lambda_laplacian),
                           **guidance_changes(method, cfg_scale, t_start, t_end, updates_per_t, lr_lora))

    @classmethod
    def check_values(cls, values):
        check_prompt_value(values, NODE)
        if known(values, *CONFIG_INPUTS):
            cls.build_config(**values)

    def run(self, refiner, mesh, prompt, negative_prompt, seed, iterations, resolution, denoise_resolution,
            views_per_update, method, cfg_scale, t_start, t_end, updates_per_t, refine_geometry, lr_geometry,
            lr_grid, lr_mlp, lr_lora, lambda_normal_consistency, lambda_laplacian, preview_views,
            preview_resolution):
        config = self.build_config(**locals())  # the widgets by name (build_config ignores the rest)
        with engine_call(node="SDXLRefine", memory_hint=MEMORY_HINT):
            state = run_refine_stage(refiner, mesh, prompt, negative_prompt, config,
                                     callbacks=hosting.comfy_progress(config.iterations))
            preview = state.turntable(preview_views, preview_resolution)
        return (state, to_image(preview))
