"""DreamFlowExtractMesh: NeRF density -> triangle mesh (marching cubes), the start of stage 2."""

from __future__ import annotations

from dreamflow.stages import ExtractConfig, extract_mesh_state

from .common import CATEGORY, MESH, NERF, PREVIEW_ROWS, TableNode, engine_call, to_image
from .widgets import Widget, WidgetTable

#: The node's widgets, in saved-workflow order: one row each (name, config field, range, tooltip).
WIDGETS = WidgetTable(
    Widget("resolution", "resolution", "INT", 8, 1024, 8,
           "Density grid samples per axis for marching cubes (256: ~0.008 world units per voxel)."),
    Widget("threshold", "threshold", "FLOAT", -1.0, 1e6, 0.5, default=-1.0,
           to_config=lambda v: "auto" if v < 0 else float(v),
           tooltip="Density iso-level of the surface. Negative: automatic (robust rule from the density's range; "
                   "threestudio's fixed value is 25)."),
    Widget("face_budget", "face_budget", "INT", 0, 10_000_000, 1000, "Decimate to at most this many faces (0: keep all)."),
) + PREVIEW_ROWS


class ExtractMesh(TableNode):
    node_name = "DreamFlowExtractMesh"
    widgets, config_class = WIDGETS, ExtractConfig

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "nerf": (NERF, {"tooltip": "The NeRF to turn into a mesh (a NeRF stage's output)."}),
                **WIDGETS.inputs(ExtractConfig()),
            }
        }

    RETURN_TYPES = (MESH, "IMAGE")
    RETURN_NAMES = ("mesh", "preview")
    OUTPUT_TOOLTIPS = ("The extracted mesh with the NeRF's colour field, for the mesh stage, SDXL refine or "
                       "Save GLB.", "Turntable renders of the mesh, [views, H, W, 3].")
    FUNCTION = "extract"
    CATEGORY = f"{CATEGORY}/stages"
    DESCRIPTION = ("Extracts a watertight triangle mesh from a NeRF: density on a grid, marching cubes, floater "
                   "removal, decimation to the face budget. The NeRF's colour field comes along.")

    @WIDGETS.method("nerf")
    def extract(self, nerf, **widgets):
        config = self.build_config(**widgets)
        with engine_call(node="ExtractMesh", memory_hint=f"resolution (now {widgets['resolution']}), "
                                                         f"preview_resolution or preview_views"):
            mesh = extract_mesh_state(nerf, config)
            preview = mesh.turntable(widgets["preview_views"], widgets["preview_resolution"])
        return (mesh, to_image(preview))
