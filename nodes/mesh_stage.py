"""DreamFlowMeshStage: stage 2, the mesh's geometry and texture fine-tuned by APFO under SD 1.x/2.x."""

from __future__ import annotations

from dreamflow.stages import MeshStageConfig, run_mesh_stage

from .common import (CAMERA_ROWS, CATEGORY, DENOISER, GUIDANCE_ROWS, MESH, MESH_ROWS, PREVIEW_ROWS,
                     PROMPT_OVERRIDE_ROWS, StageNode, stage_rows)
from .widgets import Widget, WidgetTable

NODE = "DreamFlowMeshStage"

#: The node's widgets, in saved-workflow order: one row each (name, config field, range, tooltip).
WIDGETS = (PROMPT_OVERRIDE_ROWS
           + stage_rows("the mesh", 2048, "Rasterised image size, pixels (paper stage 2: 512).",
                        "Random cameras per update.")
           + GUIDANCE_ROWS + MESH_ROWS + PREVIEW_ROWS
           # last, so that workflows saved before them keep their widget values
           + WidgetTable(Widget("texture_only", "optimize_geometry", "BOOLEAN", default=False,
                                to_config=lambda v: not v,
                                tooltip="Freeze the geometry: optimise the colour field only, the vertices stay "
                                        "bit-identical (texture a loaded mesh)."))
           + CAMERA_ROWS)


class MeshStage(StageNode):
    node_name = NODE
    widgets, config_class = WIDGETS, MeshStageConfig

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "denoiser": (DENOISER, {"tooltip": "An SD 1.x/2.x denoiser (paper: SD 2.1, as in the NeRF stage)."}),
                "mesh": (MESH, {"tooltip": "The mesh to fine-tune (ExtractMesh's output, a loaded mesh state, or "
                                           "DreamFlow Load Mesh / a converted MESH or TRIMESH)."}),
                **WIDGETS.inputs(MeshStageConfig()),
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

    @WIDGETS.method("denoiser", "mesh")
    def run(self, denoiser, mesh, **widgets):
        # an empty prompt is the mesh's own (the prompt flows with the state); the stage checks it when it runs
        return self.run_stage(run_mesh_stage, denoiser, mesh, widgets=widgets)
