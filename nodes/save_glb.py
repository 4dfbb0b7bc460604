"""DreamFlowSaveGLB: a mesh state -> textured .glb in the output folder (for core Preview3D)."""

from __future__ import annotations

import posixpath

from dreamflow.export import ExportConfig

from .common import CATEGORY, MESH, check_state, engine_call, int_input, make_config

NODE = "DreamFlowSaveGLB"


class SaveGLB:
    @classmethod
    def INPUT_TYPES(cls):
        c = ExportConfig()
        return {
            "required": {
                "mesh": (MESH, {"tooltip": "The textured mesh to save (any stage's 'mesh' output)."}),
                "filename_prefix": ("STRING", {"default": "dreamflow/object",
                                               "tooltip": "File name prefix inside the output folder; a counter and "
                                                          ".glb are appended (dreamflow/object_00001_.glb)."}),
                "texture_size": int_input(c, "texture_size", 64, 8192, "Width = height of the baked base-colour "
                                          "texture, texels.", step=64),
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

    def save(self, mesh, filename_prefix, texture_size):
        from dreamflow.io import next_output_path
        from dreamflow.state import MeshState

        config = make_config(ExportConfig, texture_size=texture_size)
        check_state(mesh, MeshState, NODE, "mesh", "connect a stage's 'mesh' output (a NeRF must go through "
                                                   "ExtractMesh first)")
        full, rel = next_output_path(filename_prefix, "glb")
        with engine_call():
            mesh.export_glb(full, config)
        subfolder, filename = posixpath.split(rel)
        return {"ui": {"3d": [{"filename": filename, "subfolder": subfolder, "type": "output"}]}, "result": (rel,)}
