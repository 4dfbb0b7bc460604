"""DreamFlowSDXLRefine: stage 3, the mesh's texture refined at 1024 px by APFO under the SDXL refiner."""

from __future__ import annotations

from dreamflow.stages import RefineConfig, run_refine_stage

from .common import (CATEGORY, DENOISER, GUIDANCE_ROWS, MESH, MESH_ROWS, PREVIEW_ROWS, PROMPT_OVERRIDE_ROWS, StageNode,
                     stage_rows)
from .widgets import Widget, WidgetTable

NODE = "DreamFlowSDXLRefine"

#: The node's widgets, in saved-workflow order: one row each (name, config field, range, tooltip).
WIDGETS = (PROMPT_OVERRIDE_ROWS
           + stage_rows("the refinement", 2048, "Rasterised image size, pixels (paper stage 3 and the refiner's "
                        "native size: 1024).", "Random cameras per update.")
           + GUIDANCE_ROWS
           + WidgetTable(Widget("refine_geometry", "optimize_geometry", "BOOLEAN", to_config=bool,
                                tooltip="Also move the vertices. Off (the paper's setting): texture only, the "
                                        "vertices stay bit-identical."))
           + MESH_ROWS + PREVIEW_ROWS)


class SDXLRefine(StageNode):
    node_name = NODE
    widgets, config_class = WIDGETS, RefineConfig

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
        # an empty prompt is the mesh's own (the prompt flows with the state); the stage checks it when it runs
        return self.run_stage(run_refine_stage, refiner, mesh, widgets=widgets)
