"""DreamFlowNeRFStage: stage 1, a NeRF optimised by APFO (or SDS / VSD) under an SD 1.x/2.x denoiser."""

from __future__ import annotations

from dreamflow.stages import NeRFStageConfig, run_nerf_stage

from .common import (CAMERA_ROWS, CATEGORY, DENOISER, GUIDANCE_ROWS, LR_LORA, NERF, PREVIEW_ROWS, StageNode,
                     check_prompt_value, prompt_rows, stage_rows)
from .widgets import Widget, WidgetTable

#: The node's widgets, in saved-workflow order: one row each (name, config field, range, tooltip).
WIDGETS = (prompt_rows("A corgi standing up drinking boba.")
           + stage_rows("the NeRF", 1024, "Rendered image size, pixels (paper stage 1: 256); renders are resized to "
                        "the denoiser's input size.", "Random cameras rendered per update (the batch of one guidance "
                        "call).")
           + GUIDANCE_ROWS
           + WidgetTable(
               Widget("lr_grid", "lr_grid", "FLOAT", 0.0, 1.0, 0.0001,
                      "AdamW learning rate of the hash-grid features (threestudio: 0.01)."),
               Widget("lr_mlp", "lr_mlp", "FLOAT", 0.0, 1.0, 0.0001,
                      "AdamW learning rate of the density / albedo MLPs (threestudio: 0.001)."),
               LR_LORA,
               Widget("lambda_sparsity", "lambda_sparsity", "FLOAT", 0.0, 1e4, 0.1,
                      "Weight of the opacity sparsity loss against floaters (threestudio prolificdreamer: 10)."),
               Widget("lambda_orient", "lambda_orient", "FLOAT", 0.0, 1e4, 0.1,
                      "Weight of DreamFusion's orientation loss (normals facing the camera; 0: off, cheaper)."),
               Widget("grid_levels", "nerf.grid.n_levels", "INT", 1, 32, 1,
                      "Hash-grid resolution levels (threestudio: 16; fewer levels: coarser detail, faster updates)."),
               Widget("grid_log2_size", "nerf.grid.log2_hashmap_size", "INT", 10, 24, 1,
                      "log2 of the hash-table entries per level (threestudio: 19; smaller: faster on CPU, more "
                      "collisions)."),
               Widget("n_samples", "render.n_samples", "INT", 2, 1024, 1,
                      "Coarse samples per ray of the volume renderer (NeRF: 64)."),
               Widget("n_importance", "render.n_importance", "INT", 0, 1024, 1,
                      "Fine samples per ray drawn from the coarse weights (0: coarse only)."))
           + PREVIEW_ROWS
           + CAMERA_ROWS)  # last, so that workflows saved before them keep their widget values


NODE = "DreamFlowNeRFStage"


class NeRFStage(StageNode):
    node_name = NODE
    widgets, config_class = WIDGETS, NeRFStageConfig
    memory_hint = "views_per_update, resolution, n_samples / n_importance, grid_log2_size or preview_resolution"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "denoiser": (DENOISER, {"tooltip": "An SD 1.x/2.x denoiser from DreamFlow Load Denoiser "
                                                   "(paper: SD 2.1-base)."}),
                **WIDGETS.inputs(NeRFStageConfig()),
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
    def check_values(cls, values):
        check_prompt_value(values, NODE)
        super().check_values(values)

    @WIDGETS.method("denoiser", optional=("init",))
    def run(self, denoiser, init=None, **widgets):
        return self.run_stage(run_nerf_stage, denoiser, widgets=widgets, init=init)
