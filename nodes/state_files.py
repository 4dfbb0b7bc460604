"""DreamFlowSaveState / DreamFlowLoadState: NeRF and mesh states as .safetensors, to resume, share and
insert custom stages between DreamFlow's own."""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

from dreamflow import hosting
from dreamflow.errors import DreamFlowError
from dreamflow.io import read_state_header

from .common import CATEGORY, MESH, NERF, OUTPUT_TAG, Checked, engine_call, file_list_row, input_directory
from .widgets import Widget, WidgetTable

INPUT_TAG = " [input]"
"""ComfyUI's annotated file names (``folder_paths.get_annotated_filepath``): where a listed file lives."""


def state_format(path: str) -> Optional[str]:
    """The ``format`` of a DreamFlow state file's header, or ``None`` for any other file (header only)."""
    header = read_state_header(path)
    return header.get("format") if header else None


# path -> (mtime_ns, size, format): ComfyUI asks for LoadState's list on every /object_info request, and an output
# folder can hold thousands of .safetensors files; a header is read again only when its file changed.
_formats: Dict[str, Tuple[int, int, Optional[str]]] = {}


def _cached_format(path: str) -> Optional[str]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    hit = _formats.get(path)
    if hit is not None and hit[:2] == (st.st_mtime_ns, st.st_size):
        return hit[2]
    fmt = state_format(path)
    _formats[path] = (st.st_mtime_ns, st.st_size, fmt)
    return fmt


def _state_files(root: str) -> List[str]:
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".safetensors") and _cached_format(os.path.join(folder, name)):
                found.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    return sorted(found)


def list_state_files() -> List[str]:
    """State files in the input folder (plain names) and the output folder (names + " [output]")."""
    return (_state_files(input_directory())
            + [f + OUTPUT_TAG for f in _state_files(hosting.output_directory())])


def resolve_state_file(name: str) -> str:
    """A listed name -> absolute path, kept inside its folder. Headless, an existing path also works."""
    if name.endswith(OUTPUT_TAG):
        root, rel = hosting.output_directory(), name[: -len(OUTPUT_TAG)]
    else:
        root, rel = input_directory(), name[: -len(INPUT_TAG)] if name.endswith(INPUT_TAG) else name
    root = os.path.abspath(root)
    path = os.path.abspath(os.path.join(root, rel))
    if os.path.isfile(path) and os.path.commonpath([root, path]) == root:
        return path
    if hosting.folder_paths() is None and os.path.isfile(name):
        return os.path.abspath(name)
    raise DreamFlowError(f"DreamFlowLoadState: state file '{name}' not found in {root}; save one with DreamFlow Save "
                         f"State or copy it into the input folder, then pick it from the list")


#: Save State's widgets (one row each; its states are sockets).
SAVE_WIDGETS = WidgetTable(
    Widget("filename_prefix", kind="STRING", default="dreamflow/state",
           tooltip="File name prefix inside the output folder; a counter and .safetensors are appended."),
)
#: Load State's widget: the file.
LOAD_WIDGETS = WidgetTable(
    file_list_row("state_file", list_state_files, "A DreamFlow state (.safetensors) in the input folder, or in the "
                                                  "output folder (marked [output]) as written by Save State."),
)


class SaveState(Checked):
    node_name = "DreamFlowSaveState"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": SAVE_WIDGETS.inputs(),
            "optional": {
                "nerf": (NERF, {"tooltip": "A NeRF state to save (connect this or 'mesh', not both)."}),
                "mesh": (MESH, {"tooltip": "A mesh state to save (connect this or 'nerf', not both)."}),
            },
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("state_path",)
    OUTPUT_TOOLTIPS = ("Path of the saved state relative to the output folder.",)
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = f"{CATEGORY}/io"
    DESCRIPTION = ("Saves a NeRF or mesh state (weights, settings, prompt) as .safetensors in the output folder: "
                   "resume later, share it, or run your own stage on it. Safe to load: no pickle.")

    @classmethod
    def check_values(cls, values):
        from dreamflow.io import check_output_target

        if values.get("filename_prefix") is not None:
            check_output_target(values["filename_prefix"])

    def save(self, filename_prefix, nerf=None, mesh=None):
        from dreamflow.io import claimed_output
        from dreamflow.state import NoState

        nerf, mesh = (None if isinstance(x, NoState) else x for x in (nerf, mesh))
        if (nerf is None) == (mesh is None):
            raise DreamFlowError(f"DreamFlowSaveState: connect exactly one of 'nerf' or 'mesh' "
                                 f"({'both are' if nerf is not None else 'neither is'} connected)")
        with claimed_output(filename_prefix, "safetensors") as (full, rel):
            (nerf if nerf is not None else mesh).save(full)
        return {"ui": {"text": [rel]}, "result": (rel,)}


class LoadState(Checked):
    node_name = "DreamFlowLoadState"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": LOAD_WIDGETS.inputs()}

    RETURN_TYPES = (NERF, MESH)
    RETURN_NAMES = ("nerf", "mesh")
    OUTPUT_TOOLTIPS = ("The NeRF state, when the file holds one (else using it is an error that says so).",
                       "The mesh state, when the file holds one (else using it is an error that says so).")
    FUNCTION = "load"
    CATEGORY = f"{CATEGORY}/io"
    DESCRIPTION = ("Loads a NeRF or mesh state saved by Save State; the file decides which output carries it. "
                   "Connect 'nerf' to a NeRF stage's init or ExtractMesh, 'mesh' to the mesh/refine stages or Save GLB.")

    @classmethod
    def IS_CHANGED(cls, state_file):
        # re-run when the file changes on disk (ComfyUI caches outputs while inputs are equal)
        try:
            st = os.stat(resolve_state_file(state_file))
            return f"{st.st_mtime_ns}-{st.st_size}"
        except DreamFlowError:
            return state_file

    @classmethod
    def check_values(cls, values):
        from dreamflow.state import check_state_file

        if values.get("state_file") is not None:
            check_state_file(resolve_state_file(values["state_file"]))

    def load(self, state_file):
        from dreamflow.state import NeRFState, NoState, load_state

        with engine_call(free=False):  # tensors made outside inference mode: the stages train them further
            state = load_state(resolve_state_file(state_file))
        if isinstance(state, NeRFState):
            return state, NoState(f"'{state_file}' holds a NeRF state; use Load State's 'nerf' output")
        return NoState(f"'{state_file}' holds a mesh state; use Load State's 'mesh' output"), state
