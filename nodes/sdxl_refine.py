"""DreamFlowSDXLRefine: stage 3, the texture (and optionally geometry) refined under the SDXL refiner."""

from __future__ import annotations

from dreamflow import hosting
from dreamflow.stages import RefineConfig, run_refine_stage

from .common import (CATEGORY, DENOISER, GUIDANCE_ROWS, MESH, MESH_ROWS, PREVIEW_ROWS, PROMPT_OVERRIDE_ROWS,
                     engine_call, stage_rows, to_image)
from .widgets import Widget, WidgetTable

#: The node's widgets, in saved-workflow order: one row each (name, config field, range, tooltip).
WIDGETS = (PROMPT_OVERRIDE_ROWS
           + stage_rows("the refinement", 2048, "Rasterised image size, pixels (paper stage 3 and the refiner's "
                        "native size: 1024).", "Random cameras per update.")
           + GUIDANCE_ROWS
           + WidgetTable(Widget("refine_geometry", "optimize_geometry", "BOOLEAN", to_config=bool,
                                tooltip="Also move the vertices (off, the paper's setting: texture only, the mesh "
                                        "stage's geometry is kept)."))
           + MESH_ROWS + PREVIEW_ROWS)


class SDXLRefine:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "refiner": (DENOISER, {"tooltip": "The SDXL refiner from DreamFlow Load Denoiser "
                                                  "(sd_xl_refiner_1.0)."}),
                "mesh": (MESH, {"tooltip": "The mesh to refine (the mesh stage's output)."}),
                **WIDGETS.inputs(RefineConfig()),
            }
        }

    RETURN_TYPES = (MESH, "IMAGE")
    RETURN_NAMES = ("mesh", "preview")
    OUTPUT_TOOLTIPS = ("The refined textured mesh, for Save GLB.", "Turntable renders of the mesh, [views, H, W, 3].")
    FUNCTION = "run"
    CATEGORY = f"{CATEGORY}/stages"
    DESCRIPTION = ("Stage 3 of DreamFlow: refines the mesh's texture at 1024 px under the SDXL refiner with APFO's "
                   "low-noise schedule (t 0.3 -> 0); optionally the geometry too.")

    @WIDGETS.method("refiner", "mesh")
    def run(self, refiner, mesh, **widgets):
        config = WIDGETS.config(RefineConfig, widgets)
        with engine_call():
            state = run_refine_stage(refiner, mesh, widgets["prompt"], widgets["negative_prompt"], config,
                                     callbacks=hosting.comfy_progress(config.iterations))
            preview = state.turntable(widgets["preview_views"], widgets["preview_resolution"])
        return (state, to_image(preview))
