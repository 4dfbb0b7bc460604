"""DreamFlowSaveGLB: a mesh state -> textured .glb in the output folder (for core Preview3D)."""

from __future__ import annotations

import os
import posixpath

from dreamflow.export import ExportConfig, turntable_path

from .common import CATEGORY, MESH, TableNode, check_state, engine_call
from .widgets import Widget, WidgetTable

NODE = "DreamFlowSaveGLB"

#: The node's widgets, in saved-workflow order: one row each (name, config field, range, tooltip).
WIDGETS = WidgetTable(
    Widget("filename_prefix", kind="STRING", default="dreamflow/object",
           tooltip="File name prefix inside the output folder; a counter and .glb are appended "
                   "(dreamflow/object_00001_.glb)."),
    Widget("texture_size", "texture_size", "INT", 64, 8192, 64,
           "Width = height of the baked base-colour texture, texels."),
    Widget("turntable_views", "turntable", "INT", 0, 360, 1,
           "Views of a turntable of the saved, textured mesh, written beside the GLB as <name>_turntable.png and "
           "shown on this node (0: none)."),
    Widget("turntable_resolution", "turntable_resolution", "INT", 16, 4096, 16, "Side of each turntable view, pixels."),
)


class SaveGLB(TableNode):
    node_name = NODE
    widgets, config_class = WIDGETS, ExportConfig

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "mesh": (MESH, {"tooltip": "The textured mesh to save (any stage's 'mesh' output)."}),
                **WIDGETS.inputs(ExportConfig()),
            }
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("glb_path",)
    OUTPUT_TOOLTIPS = ("Path of the saved .glb relative to the output folder; connect it to Preview3D's model_file.",)
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = f"{CATEGORY}/io"
    DESCRIPTION = ("Saves the mesh as a binary glTF (.glb): UV atlas, baked base-colour texture, PBR material; "
                   "+Y up, facing +Z. The file is written atomically (never half a file).")

    @classmethod
    def check_values(cls, values):
        from dreamflow.io import check_output_target

        if values.get("filename_prefix") is not None:
            check_output_target(values["filename_prefix"])
        super().check_values(values)

    @WIDGETS.method("mesh")
    def save(self, mesh, filename_prefix, turntable_views, **widgets):
        from dreamflow.io import claimed_output
        from dreamflow.state import MeshState

        config = self.build_config(**widgets, turntable_views=turntable_views)
        check_state(mesh, MeshState, NODE, "mesh", "connect a stage's 'mesh' output (a NeRF must go through "
                                                   "ExtractMesh first)")
        with claimed_output(filename_prefix, "glb") as (full, rel), \
                engine_call(node="SaveGLB", memory_hint="texture_size or turntable_resolution"):
            mesh.export_glb(full, config)
        subfolder, filename = posixpath.split(rel)
        ui = {"3d": [{"filename": filename, "subfolder": subfolder, "type": "output"}]}
        if turntable_views > 0:
            ui["images"] = [{"filename": os.path.basename(turntable_path(full)), "subfolder": subfolder,
                             "type": "output"}]
        return {"ui": ui, "result": (rel,)}
