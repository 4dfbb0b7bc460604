"""DreamFlowNeRFStage: stage 1, a NeRF optimised by APFO (or SDS / VSD) under an SD 1.x/2.x denoiser."""

from __future__ import annotations

from dreamflow import hosting
from dreamflow.stages import NeRFStageConfig, run_nerf_stage

from .common import (CATEGORY, DENOISER, NERF, Checked, camera_changes, camera_inputs, check_prompt_value, denoise_resolution_input, engine_call,
                     float_input, guidance_changes, guidance_inputs, int_input, known, lr_lora_input, make_config,
                     preview_inputs, prompt_inputs, seed_input, to_image)


NODE = "DreamFlowNeRFStage"


class NeRFStage(Checked):
    node_name = NODE

    @classmethod
    def INPUT_TYPES(cls):
        c = NeRFStageConfig()
        return {
            "required": {
                "denoiser": (DENOISER, {"tooltip": "An SD 1.x/2.x denoiser from DreamFlow Load Denoiser "
                                                   "(paper: SD 2.1-base)."}),
                **prompt_inputs("A corgi standing up drinking boba."),
                "seed": seed_input(c),
                "iterations": int_input(c, "iterations", 1, 100000, "Optimisation updates of the NeRF."),
                "resolution": int_input(c, "resolution", 16, 1024, "Rendered image size, pixels (paper stage 1: "
                                        "256); renders are resized to the denoiser's input size.", step=16),
                "denoise_resolution": denoise_resolution_input(c),
                "views_per_update": int_input(c, "views_per_update", 1, 64, "Random cameras rendered per update "
                                              "(the batch of one guidance call)."),
                **guidance_inputs(c),
                "lr_grid": float_input(c, "lr_grid", 0.0, 1.0, 0.0001, "AdamW learning rate of the hash-grid "
                                       "features (threestudio: 0.01)."),
                "lr_mlp": float_input(c, "lr_mlp", 0.0, 1.0, 0.0001, "AdamW learning rate of the density / albedo "
                                      "MLPs (threestudio: 0.001)."),
                "lr_lora": lr_lora_input(c),
                "lambda_sparsity": float_input(c, "lambda_sparsity", 0.0, 1e4, 0.1, "Weight of the opacity "
                                               "sparsity loss against floaters (threestudio prolificdreamer: 10)."),
                "lambda_orient": float_input(c, "lambda_orient", 0.0, 1e4, 0.1, "Weight of DreamFusion's "
                                             "orientation loss (normals facing the camera; 0: off, cheaper)."),
                "grid_levels": int_input(c, "nerf.grid.n_levels", 1, 32, "Hash-grid resolution levels (threestudio: "
                                         "16; fewer levels: coarser detail, faster updates)."),
                "grid_log2_size": int_input(c, "nerf.grid.log2_hashmap_size", 10, 24, "log2 of the hash-table "
                                            "entries per level (threestudio: 19; smaller: faster on CPU, more "
                                            "collisions)."),
                "n_samples": int_input(c, "render.n_samples", 2, 1024, "Coarse samples per ray of the volume "
                                       "renderer (NeRF: 64)."),
                "n_importance": int_input(c, "render.n_importance", 0, 1024, "Fine samples per ray drawn from the "
                                          "coarse weights (0: coarse only)."),
                **preview_inputs(),
                **camera_inputs(c),  # last, so that workflows saved before them keep their widget values
            },
            "optional": {
                "init": (NERF, {"tooltip": "Continue from this NeRF (a previous NeRF stage or a loaded state) "
                                           "instead of a fresh one."}),
            },
        }

    RETURN_TYPES = (NERF, "IMAGE")
    RETURN_NAMES = ("nerf", "preview")
    OUTPUT_TOOLTIPS = ("The optimised NeRF (hash grid + MLPs + background) for ExtractMesh, another NeRF stage "
                       "or Save State.", "Turntable renders of the NeRF, [views, H, W, 3].")
    FUNCTION = "run"
    CATEGORY = f"{CATEGORY}/stages"
    DESCRIPTION = ("Stage 1 of DreamFlow: optimises a NeRF so its renders follow the denoiser's probability flow "
                   "for the prompt (APFO), or SDS/VSD for comparison. Shows progress and live previews; "
                   "cancel stops within one update.")

    @classmethod
    def build_config(cls, seed, iterations, resolution, denoise_resolution, views_per_update, method, cfg_scale,
                     t_start, t_end, updates_per_t, lr_grid, lr_mlp, lr_lora, lambda_sparsity, lambda_orient,
                     grid_levels, grid_log2_size, n_samples, n_importance, elevation_min=-10.0, elevation_max=45.0, **_):
        return make_config(NeRFStageConfig, seed=seed, iterations=iterations, resolution=resolution,
                           denoise_resolution=denoise_resolution, views_per_update=views_per_update,
                           lr_grid=lr_grid, lr_mlp=lr_mlp, lambda_sparsity=lambda_sparsity, lambda_orient=lambda_orient,
                           **{"nerf.grid.n_levels": grid_levels, "nerf.grid.log2_hashmap_size": grid_log2_size,
                              "render.n_samples": n_samples, "render.n_importance": n_importance},
                           **camera_changes(elevation_min, elevation_max),
                           **guidance_changes(method, cfg_scale, t_start, t_end, updates_per_t, lr_lora))

    @classmethod
    def check_values(cls, values):
        check_prompt_value(values, NODE)
        if known(values, *CONFIG_INPUTS):
            cls.build_config(**values)

    def run(self, denoiser, prompt, negative_prompt, seed, iterations, resolution, denoise_resolution,
            views_per_update, method, cfg_scale, t_start, t_end, updates_per_t, lr_grid, lr_mlp, lr_lora,
            lambda_sparsity, lambda_orient, grid_levels, grid_log2_size, n_samples, n_importance, preview_views,
            preview_resolution, elevation_min, elevation_max, init=None):
        config = self.build_config(**locals())  # the widgets by name (build_config ignores the rest)
        with engine_call(node="NeRFStage", memory_hint=MEMORY_HINT):
            state = run_nerf_stage(denoiser, prompt, negative_prompt, config,
                                   callbacks=hosting.comfy_progress(config.iterations), init=init)
            preview = state.turntable(preview_views, preview_resolution)
        return (state, to_image(preview))


CONFIG_INPUTS = ("seed", "iterations", "resolution", "denoise_resolution", "views_per_update", "method", "cfg_scale",
                 "t_start", "t_end", "updates_per_t", "lr_grid", "lr_mlp", "lr_lora", "lambda_sparsity",
                 "lambda_orient", "grid_levels", "grid_log2_size", "n_samples", "n_importance")
MEMORY_HINT = "views_per_update, resolution, n_samples / n_importance, grid_log2_size or preview_resolution"
