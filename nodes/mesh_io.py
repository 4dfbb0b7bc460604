"""Meshes in and out of DreamFlow: DreamFlowLoadMesh (a file) and converters to / from ComfyUI core's ``MESH``
and ``TRIMESH`` (``trimesh.Trimesh``, what most 3D packs pass). The work is in ``dreamflow.mesh_io``.

Each node's widgets are one :class:`~.widgets.WidgetTable` (one row per widget), read both to build ``INPUT_TYPES``
and to map widget values onto :class:`~dreamflow.mesh_io.MeshImportConfig`.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import List

from dreamflow import hosting
from dreamflow.errors import DreamFlowError
from dreamflow.mesh_io import MAX_FACES, MESH_EXTENSIONS, UP_AXES, MeshImportConfig

from .common import CATEGORY, MESH, check_state, engine_call, file_list_row, input_directory
from .widgets import Widget, WidgetTable

CORE_MESH = "MESH"
"""ComfyUI core's mesh type (``comfy_extras/nodes_hunyuan3d.py``: VoxelToMesh makes it, SaveGLB takes it)."""
TRIMESH = "TRIMESH"
"""A ``trimesh.Trimesh`` object (the mesh type most 3D packs pass)."""
INPUT_TAG = " [input]"
EXAMPLE_TAG = " [example]"
"""Meshes shipped in the pack's ``samples/`` (listed with this tag, so a workflow runs out of the box)."""


def _examples_dir() -> str:
    """The pack's ``samples/`` folder (beside ``nodes/``)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "samples")


# The import settings Load Mesh and the TRIMESH / MESH converters share, as rows of their tables. ``recenter``
# defaults to the config's (on) in Load Mesh and to off in the converters, which keep other packs' coordinates.
RECENTER = Widget("recenter", "recenter", "BOOLEAN", tooltip=(
    "Move the mesh's centre to the origin and scale it so that its largest half-extent is "
    f"{MeshImportConfig().extent:g} world units, as the stages' cameras frame objects. Off: the coordinates are kept (they "
    "must lie inside [-1, 1]^3)."))
KEEP_COLORS = Widget("keep_colors", "colors", "BOOLEAN", tooltip=(
    "Start the colour field from the mesh's texture / vertex colours (a short fit); off: a plain grey start."))
IMPORT_ROWS = WidgetTable(
    Widget("up_axis", "up_axis", "COMBO", choices=UP_AXES, tooltip=(
        "The mesh's up axis. +Y: glTF and most OBJ files; +Z: many scans and CAD / PLY exports (turned to "
        "DreamFlow's +Y up).")),
    Widget("decimate_to", "decimate_to", "INT", 0, MAX_FACES, tooltip=(
        f"Decimate meshes with more faces to this many (0: off; meshes over {MAX_FACES:,} faces need it).")),
    Widget("color_fit_steps", "fit_steps", "INT", 0, 10000, tooltip=(
        "Updates of the colour field's fit to the mesh's colours (0: none). Each is cheap on a GPU and slower on "
        "a CPU, more so with more grid levels (timings: bench/RESULTS.md).")),
    Widget("grid_levels", "field.grid.n_levels", "INT", 1, 32, 1, (
        "Hash-grid levels of the colour field (the NeRF stage's default: 16; 8 is plenty for small renders "
        "and much faster on a CPU).")),
    Widget("grid_log2_size", "field.grid.log2_hashmap_size", "INT", 10, 24, 1, (
        "log2 of the colour field's hash-table entries per level (default 19).")),
)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def _mesh_files(root: str) -> List[str]:
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            if name.lower().endswith(MESH_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    return sorted(found)


def list_mesh_files() -> List[str]:
    """Mesh files in the input folder (and its sub-folders, e.g. ``3d/`` where core's 3D upload puts them), then
    the pack's example meshes (marked [example])."""
    return _mesh_files(input_directory()) + [f + EXAMPLE_TAG for f in _mesh_files(_examples_dir())]


def resolve_mesh_file(name: str) -> str:
    """A listed name -> absolute path inside its folder; headless, any existing path also works. A name with
    another extension is passed on, so that the loader says which extensions it reads."""
    if name.endswith(EXAMPLE_TAG):
        root, rel = os.path.abspath(_examples_dir()), name[: -len(EXAMPLE_TAG)]
    else:
        root = os.path.abspath(input_directory())
        rel = name[: -len(INPUT_TAG)] if name.endswith(INPUT_TAG) else name
    path = os.path.abspath(os.path.join(root, rel))
    if os.path.isfile(path) and os.path.commonpath([root, path]) == root:
        return path
    if hosting.folder_paths() is None and os.path.isfile(name):
        return os.path.abspath(name)
    if not name.lower().endswith(MESH_EXTENSIONS):
        return name  # the loader's one-line error names the extensions
    raise DreamFlowError(f"DreamFlowLoadMesh: mesh file '{name}' not found in {root}; upload it or copy it into the "
                         f"input folder, then pick it from the list")


#: Load Mesh's widgets, in saved-workflow order: one row each (name, config field, range, tooltip).
LOAD_WIDGETS = WidgetTable(
    file_list_row("mesh_file", list_mesh_files, f"A mesh ({', '.join(MESH_EXTENSIONS)}) in ComfyUI's input folder "
                                                f"(the upload button puts one into input/3d), or one of the pack's "
                                                f"[example] meshes. Headless: also a path."),
    RECENTER, KEEP_COLORS) + IMPORT_ROWS


class LoadMesh:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": LOAD_WIDGETS.inputs(MeshImportConfig())}

    RETURN_TYPES = (MESH,)
    RETURN_NAMES = ("mesh",)
    OUTPUT_TOOLTIPS = ("The mesh as a DreamFlow mesh state, for MeshStage (texture_only to keep its shape), "
                       "SDXLRefine or Save GLB.",)
    FUNCTION = "load"
    CATEGORY = f"{CATEGORY}/io"
    DESCRIPTION = ("Loads a GLB / glTF / OBJ / PLY mesh made elsewhere, recentred and rescaled into the stages' box; "
                   "its texture or vertex colours become the colour field's start, so MeshStage and SDXLRefine can "
                   "refine or re-texture it.")

    @classmethod
    def IS_CHANGED(cls, mesh_file, **_widgets):
        try:
            st = os.stat(resolve_mesh_file(mesh_file))
            return f"{st.st_mtime_ns}-{st.st_size}"
        except (DreamFlowError, OSError):
            return mesh_file

    @LOAD_WIDGETS.method()
    def load(self, mesh_file, **widgets):
        from dreamflow.mesh_io import load_mesh_file

        config = LOAD_WIDGETS.config(MeshImportConfig, widgets)
        with engine_call(free=False):  # made outside inference mode: the stages train the colour field further
            state = load_mesh_file(resolve_mesh_file(mesh_file), config, name=mesh_file)
        return (state,)


# --------------------------------------------------------------------------------------------
# Converters
# --------------------------------------------------------------------------------------------
def core_mesh_class():
    """ComfyUI core's MESH class when hosted, else a stand-in with the same two attributes."""
    try:
        from comfy_extras.nodes_hunyuan3d import MESH as CoreMesh  # type: ignore

        return CoreMesh
    except Exception:
        return StandInCoreMesh


class StandInCoreMesh:
    """Headless stand-in for ``comfy_extras.nodes_hunyuan3d.MESH``: ``vertices`` [B, N, 3], ``faces`` [B, F, 3]."""

    def __init__(self, vertices, faces):
        self.vertices = vertices
        self.faces = faces


MESH_IN = "DreamFlow mesh state (any stage's, Load Mesh's or Load State's 'mesh' output)"
#: MESH to Mesh's widgets: which mesh of the batch, then the import settings (core MESH has no colours).
CORE_WIDGETS = WidgetTable(
    Widget("index", kind="INT", lo=0, hi=4096, default=0, tooltip="Which mesh of the MESH batch."),
    replace(RECENTER, default=False)) + IMPORT_ROWS
#: TRIMESH to Mesh's widgets: the import settings.
TRIMESH_WIDGETS = WidgetTable(replace(RECENTER, default=False), KEEP_COLORS) + IMPORT_ROWS


class _MeshOut:
    """A DreamFlow mesh state -> another pack's mesh type (subclasses: ``RETURN_TYPES``, ``_node_id`` and ``_out``)."""

    _node_id = ""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mesh": (MESH, {"tooltip": f"A {MESH_IN}."})}}

    FUNCTION = "convert"
    CATEGORY = f"{CATEGORY}/convert"

    def convert(self, mesh):
        from dreamflow.state import MeshState

        check_state(mesh, MeshState, self._node_id, "mesh", "connect a DreamFlow mesh output")
        return (self._out(mesh),)


class MeshToCoreMesh(_MeshOut):
    _node_id = "DreamFlowMeshToCoreMesh"
    RETURN_TYPES = (CORE_MESH,)
    RETURN_NAMES = ("MESH",)
    OUTPUT_TOOLTIPS = ("ComfyUI core's MESH (batch of one; geometry only, core MESH has no colours), e.g. for core "
                       "Save GLB.",)
    DESCRIPTION = "A DreamFlow mesh as ComfyUI core's MESH (vertices and faces, exactly)."

    @staticmethod
    def _out(mesh):
        from dreamflow.mesh_io import to_core_arrays

        return core_mesh_class()(*to_core_arrays(mesh))


class CoreMeshToMesh:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mesh": (CORE_MESH, {"tooltip": "ComfyUI core's MESH (e.g. from VoxelToMesh)."}),
            **CORE_WIDGETS.inputs(MeshImportConfig()),
        }}

    RETURN_TYPES = (MESH,)
    RETURN_NAMES = ("mesh",)
    OUTPUT_TOOLTIPS = ("The mesh as a DreamFlow mesh state (a plain grey colour field: core MESH has no colours).",)
    FUNCTION = "convert"
    CATEGORY = f"{CATEGORY}/convert"
    DESCRIPTION = "ComfyUI core's MESH as a DreamFlow mesh state, for MeshStage / SDXLRefine (vertices and faces kept " \
                  "exactly unless recenter is on)."

    @CORE_WIDGETS.method("mesh")
    def convert(self, mesh, index, **widgets):
        from dreamflow.mesh_io import from_arrays

        v, f = getattr(mesh, "vertices", None), getattr(mesh, "faces", None)
        if v is None or f is None:
            raise DreamFlowError(f"DreamFlowCoreMeshToMesh: input 'mesh' is a {type(mesh).__name__}, not core's MESH "
                                 f"(vertices + faces); connect VoxelToMesh or another MESH output")
        if getattr(v, "dim", lambda: 3)() == 2:  # a single mesh instead of a batch
            v, f = v[None], f[None]
        if index >= len(v):
            raise DreamFlowError(f"DreamFlowCoreMeshToMesh: index {index} is past the MESH batch of {len(v)}; use "
                                 f"0..{len(v) - 1}")
        config = CORE_WIDGETS.config(MeshImportConfig, widgets)
        with engine_call(free=False):
            return (from_arrays(v[index], f[index], config, name="DreamFlowCoreMeshToMesh"),)


class MeshToTrimesh(_MeshOut):
    _node_id = "DreamFlowMeshToTrimesh"
    RETURN_TYPES = (TRIMESH,)
    RETURN_NAMES = ("trimesh",)
    OUTPUT_TOOLTIPS = ("A trimesh.Trimesh with vertex colours baked from the colour field, for other 3D packs.",)
    DESCRIPTION = "A DreamFlow mesh as a trimesh.Trimesh (TRIMESH): vertices and faces exactly, vertex colours " \
                  "sampled from the colour field."

    @staticmethod
    def _out(mesh):
        from dreamflow.mesh_io import to_trimesh

        return to_trimesh(mesh)


class TrimeshToMesh:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "trimesh": (TRIMESH, {"tooltip": "A trimesh.Trimesh (or Scene) from another 3D pack."}),
            **TRIMESH_WIDGETS.inputs(MeshImportConfig()),
        }}

    RETURN_TYPES = (MESH,)
    RETURN_NAMES = ("mesh",)
    OUTPUT_TOOLTIPS = ("The mesh as a DreamFlow mesh state; its texture / vertex colours start the colour field.",)
    FUNCTION = "convert"
    CATEGORY = f"{CATEGORY}/convert"
    DESCRIPTION = "A trimesh.Trimesh (TRIMESH) as a DreamFlow mesh state (vertices and faces kept exactly unless " \
                  "recenter is on; colours fitted into the colour field)."

    @TRIMESH_WIDGETS.method("trimesh")
    def convert(self, trimesh, **widgets):
        from dreamflow.mesh_io import from_trimesh

        config = TRIMESH_WIDGETS.config(MeshImportConfig, widgets)
        with engine_call(free=False):
            return (from_trimesh(trimesh, config, name="DreamFlowTrimeshToMesh"),)
