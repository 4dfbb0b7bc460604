"""DreamFlowExtractMesh: NeRF density -> triangle mesh (marching cubes), the start of stage 2."""

from __future__ import annotations

from dreamflow.stages import ExtractConfig, extract_mesh_state

from .common import CATEGORY, MESH, NERF, Checked, engine_call, int_input, known, make_config, preview_inputs, to_image


class ExtractMesh(Checked):
    node_name = "DreamFlowExtractMesh"

    @classmethod
    def INPUT_TYPES(cls):
        c = ExtractConfig()
        return {
            "required": {
                "nerf": (NERF, {"tooltip": "The NeRF to turn into a mesh (a NeRF stage's output)."}),
                "resolution": int_input(c, "resolution", 8, 1024, "Density grid samples per axis for marching "
                                        "cubes (256: ~0.008 world units per voxel).", step=8),
                "threshold": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 1e6, "step": 0.5, "round": False,
                                        "tooltip": "Density iso-level of the surface. Negative: automatic (robust "
                                                   "rule from the density's range; threestudio's fixed value is 25)."}),
                "face_budget": int_input(c, "face_budget", 0, 10_000_000, "Decimate to at most this many faces "
                                         "(0: keep all).", step=1000),
                **preview_inputs(),
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

    @classmethod
    def build_config(cls, resolution, threshold, face_budget, **_):
        return make_config(ExtractConfig, resolution=resolution, face_budget=face_budget,
                           threshold="auto" if threshold < 0 else float(threshold))

    @classmethod
    def check_values(cls, values):
        if known(values, "resolution", "threshold", "face_budget"):
            cls.build_config(**values)

    def extract(self, nerf, resolution, threshold, face_budget, preview_views, preview_resolution):
        config = self.build_config(resolution, threshold, face_budget)
        with engine_call(node="ExtractMesh", memory_hint=f"resolution (now {resolution}), preview_resolution or "
                                                         f"preview_views"):
            mesh = extract_mesh_state(nerf, config)
            preview = mesh.turntable(preview_views, preview_resolution)
        return (mesh, to_image(preview))
