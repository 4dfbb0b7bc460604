"""What every DreamFlow node shares: custom types, the widget rows several nodes use (``widgets.py`` tables),
the wrapper of engine calls (autograd inside ComfyUI's inference mode, memory), folders, and a state-type check.

Nodes stay thin: one widget table per node maps widgets to config fields, one engine call does the work. Widget
defaults are read from the engine's config dataclasses, so the defaults users see are the engine's (paper) defaults.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Dict, Iterator

from dreamflow import hosting
from dreamflow.hosting import DYNAMIC_LIST
from dreamflow.errors import DreamFlowError, check
from dreamflow.guidance import REGISTRY, methods  # the dropdown's order: DreamFlow's APFO first

from .widgets import Widget, WidgetTable

# Custom types carried between nodes. Namespaced so they never meet core types (MESH, MODEL, ...).
DENOISER = "DREAMFLOW_DENOISER"
NERF = "DREAMFLOW_NERF"
MESH = "DREAMFLOW_MESH"
CATEGORY = "DreamFlow"

SEED_MAX = 0xFFFFFFFFFFFFFFFF  # ComfyUI's KSampler seed range


def dynamic_list(options: Dict[str, Any]) -> Dict[str, Any]:
    """Mark a dropdown filled from this machine's files (models, states); see ``dreamflow.hosting.DYNAMIC_LIST``."""
    return {**options, DYNAMIC_LIST: True}


def file_list_row(name: str, list_files, tooltip: str) -> Widget:
    """A dropdown of this machine's files (``list_files()`` is asked whenever ``INPUT_TYPES`` is, so new files show
    up); no default: ComfyUI shows the first file."""
    return Widget(name, kind="COMBO", choices=list_files, options=dynamic_list({}), tooltip=tooltip)


def prompt_rows(default_prompt: str) -> WidgetTable:
    """The prompt widgets of the stage that starts from text (NeRFStage)."""
    return WidgetTable(
        Widget("prompt", kind="STRING", default=default_prompt, options={"multiline": True, "dynamicPrompts": False},
               tooltip="What the object is. View words (front / side / back / overhead view) are appended per camera."),
        Widget("negative_prompt", kind="STRING", default="", options={"multiline": True, "dynamicPrompts": False},
               tooltip="What to avoid (classifier-free guidance's unconditional prompt); may stay empty."),
    )


#: The prompt widgets of a stage continuing a state (MeshStage, SDXLRefine): empty = the state's prompts.
PROMPT_OVERRIDE_ROWS = WidgetTable(
    Widget("prompt", kind="STRING", default="", options={"multiline": True, "dynamicPrompts": False},
           tooltip="Empty (default): the prompt the mesh carries from the NeRF stage, typed once. Text here overrides "
                   "it for this stage (logged when it differs)."),
    Widget("negative_prompt", kind="STRING", default="", options={"multiline": True, "dynamicPrompts": False},
           tooltip="Empty (default): the mesh's negative prompt from the NeRF stage. Text here overrides it for this "
                   "stage."),
)


def seed_row(tooltip: str = "Seed of the cameras, noise and initialisation; the same seed and settings reproduce a "
                            "run on the same device.") -> Widget:
    return Widget("seed", "seed", "INT", 0, SEED_MAX, tooltip=tooltip, options={"control_after_generate": True})


def stage_rows(what: str, resolution_hi: int, resolution_tooltip: str, views_tooltip: str) -> WidgetTable:
    """seed, iterations, resolution, denoise_resolution, views_per_update: the head every stage shares."""
    return WidgetTable(
        seed_row(),
        Widget("iterations", "iterations", "INT", 1, 100000, 1, tooltip=f"Optimisation updates of {what}."),
        Widget("resolution", "resolution", "INT", 16, resolution_hi, 16, resolution_tooltip),
        Widget("denoise_resolution", "denoise_resolution", "INT", 8, 4096, 8,
               "Size the renders are resized to before the denoiser's VAE encodes them, pixels: the denoiser's native "
               "size (SD 1.5 / 2.1-base: 512, SD 2.1: 768, SDXL refiner: 1024)."),
        Widget("views_per_update", "views_per_update", "INT", 1, 64, 1, views_tooltip),
    )


#: method, cfg_scale, t_start, t_end, updates_per_t: the knobs of a stage config's ``guidance``.
GUIDANCE_ROWS = WidgetTable(
    Widget("method", "guidance.method", "COMBO", choices=methods, tooltip=lambda: "; ".join(
        f"{m}: {REGISTRY[m].summary}" if REGISTRY[m].summary else m for m in methods()) + "."),
    Widget("cfg_scale", "guidance.cfg_scale", "FLOAT", 1.0, 100.0, 0.5,
           "Classifier-free guidance scale (1 = off). APFO/VSD use ~7.5; SDS needs ~100."),
    Widget("t_start", "guidance.t_start", "FLOAT", 0.0, 1.0, 0.01,
           "Largest diffusion time, as a fraction of the 1000 training steps. APFO starts here and decreases to "
           "t_end; SDS/VSD sample t in [t_end, t_start]. Must exceed t_end."),
    Widget("t_end", "guidance.t_end", "FLOAT", 0.0, 1.0, 0.01,
           "Smallest diffusion time (fraction of 1000 steps); where APFO's schedule ends."),
    Widget("updates_per_t", "guidance.updates_per_t", "INT", 1, 1000, 1,
           tooltip="APFO: updates sharing one timestep of the schedule, each on new random views (the ODE step is "
                   "amortised over views)."),
)

LR_LORA = Widget("lr_lora", "guidance.lora.lr", "FLOAT", 0.0, 1.0, 0.00001,
                 "APFO/VSD: Adam learning rate of the scene LoRA that models the current scene (threestudio VSD: "
                 "1e-4); unused by SDS.")

#: Learning rates and regulariser weights shared by the mesh stage and SDXL refine.
MESH_ROWS = WidgetTable(
    Widget("lr_geometry", "lr_geometry", "FLOAT", 0.0, 1.0, 0.0001,
           "Adam learning rate of the bounded vertex offsets (threestudio: 0.005)."),
    Widget("lr_grid", "lr_grid", "FLOAT", 0.0, 1.0, 0.0001,
           "Adam learning rate of the colour field's hash grid (threestudio: 0.01)."),
    Widget("lr_mlp", "lr_mlp", "FLOAT", 0.0, 1.0, 0.0001, "Adam learning rate of the colour MLP (threestudio: 0.001)."),
    LR_LORA,
    Widget("lambda_normal_consistency", "lambda_normal_consistency", "FLOAT", 0.0, 1e7, 100.0,
           "Weight of the normal-consistency smoothness between adjacent faces (threestudio: 10000); applies when "
           "the geometry moves."),
    Widget("lambda_laplacian", "lambda_laplacian", "FLOAT", 0.0, 1e7, 100.0,
           "Weight of the Laplacian smoothness of the vertex offsets (threestudio: 10000); applies when the geometry "
           "moves."),
)

#: The turntable preview every stage node shows (the node's own settings, no config field).
PREVIEW_ROWS = WidgetTable(
    Widget("preview_views", kind="INT", lo=1, hi=64, default=8,
           tooltip="Views of the turntable preview image batch (azimuths evenly spaced)."),
    Widget("preview_resolution", kind="INT", lo=16, hi=2048, step=16, default=256,
           tooltip="Width = height of each preview view, pixels."),
)

#: The random cameras' elevation range (last widgets of a stage node, so saved workflows keep their values): two
#: widgets, one config field (``camera.elevation_range``, a (min, max) pair).
CAMERA_ROWS = WidgetTable(
    Widget("elevation_min", "camera.elevation_range", "FLOAT", -89.0, 89.0, 1.0, index=0,
           tooltip="Lowest camera elevation, degrees (threestudio: -10)."),
    Widget("elevation_max", "camera.elevation_range", "FLOAT", -89.0, 89.0, 1.0, index=1,
           tooltip="Highest camera elevation, degrees (threestudio: 45; above 60 the view prompt says 'overhead "
                   "view'; the toy prior was trained up to 80)."),
)


def check_widgets(cls, values: Dict[str, Any], where: str) -> Dict[str, Any]:
    """Every widget value in ``values`` checked as the runner and ComfyUI check them (type, ``min`` / ``max``,
    finite floats, dropdown choices); ``None`` (an input fed by a link, as ComfyUI passes it to
    ``VALIDATE_INPUTS``) is skipped. Returns the values converted to their types."""
    from dreamflow.node_defs import coerce, node_def

    d = node_def(where, cls.INPUT_TYPES(), cls)
    out = dict(values)
    hosted = hosting.folder_paths() is not None
    for inp in d.inputs:
        if inp.takes_value and out.get(inp.name) is not None:
            out[inp.name] = coerce(inp, out[inp.name], where)
            # hosted, a file list is this machine's (ComfyUI checks it unless VALIDATE_INPUTS takes the input)
            if hosted and inp.dynamic and inp.choices is not None and out[inp.name] not in inp.choices:
                raise DreamFlowError(f"{where} input '{inp.name}' = {out[inp.name]!r} is not one of the files found: "
                                     f"{', '.join(map(str, inp.choices[:20])) or '(none)'}")
    return out


class Checked:
    """Mixin of every DreamFlow node: all inputs are checked before any node of the workflow runs.

    ComfyUI calls ``VALIDATE_INPUTS`` when a prompt is queued (so a bad value is refused at once, not after
    the stages before it); the headless runner calls it for every node before the first one runs. Taking
    ``**values`` makes ComfyUI skip its own range checks, so :func:`check_widgets` repeats them (and adds
    the finite-float rule); then the node's :meth:`check_values` runs its own rules (prompt, config,
    prefix, files). Linked inputs arrive as ``None`` and are checked when the node runs.
    """

    node_name = ""
    """The node's id in error messages (e.g. "DreamFlowSaveGLB")."""

    @classmethod
    def VALIDATE_INPUTS(cls, **values):
        try:
            cls.check_inputs(**values)
        except DreamFlowError as e:
            return str(e)
        return True

    @classmethod
    def check_inputs(cls, **values) -> Dict[str, Any]:
        values = check_widgets(cls, values, cls.node_name or cls.__name__)
        cls.check_values(values)
        return values

    @classmethod
    def check_values(cls, values: Dict[str, Any]) -> None:
        """The node's own rules on ``values`` (``None``: linked, not known yet)."""


class TableNode(Checked):
    """A node whose widget table builds one engine config: the subclass names its ``widgets`` (the table) and
    ``config_class``; the config is built when the node runs and, when no widget is linked, at queue time."""

    widgets: WidgetTable
    config_class: type

    @classmethod
    def build_config(cls, **widgets):
        """``config_class()`` with the widgets' values, validated."""
        return cls.widgets.config(cls.config_class, widgets)

    @classmethod
    def check_values(cls, values):
        check_table(cls.widgets, cls.build_config, values)


class StageNode(TableNode):
    """A stage node (NeRFStage, MeshStage, SDXLRefine): its ``run`` names its sockets and engine function and
    hands them to :meth:`run_stage`, which runs the stage with the node's prompts and config and shows the
    turntable preview."""

    memory_hint = "views_per_update, resolution or preview_resolution"
    """The settings an out-of-memory error names."""

    def run_stage(self, stage, *inputs, widgets: Dict[str, Any], **extra):
        """``stage(*inputs, prompt, negative_prompt, config, callbacks=ComfyUI's progress, **extra)`` -> (state,
        IMAGE preview [preview_views, preview_resolution, preview_resolution, 3])."""
        config = self.build_config(**widgets)
        with engine_call(node=self.node_name.removeprefix("DreamFlow"), memory_hint=self.memory_hint):
            state = stage(*inputs, widgets["prompt"], widgets["negative_prompt"], config,
                          callbacks=hosting.comfy_progress(config.iterations), **extra)
            preview = state.turntable(widgets["preview_views"], widgets["preview_resolution"])
        return (state, to_image(preview))


def known(values: Dict[str, Any], *names: str) -> bool:
    """All of ``names`` have values (none is fed by a link)."""
    return all(values.get(n) is not None for n in names)


def check_prompt_value(values: Dict[str, Any], node: str) -> None:
    if values.get("prompt") is not None:
        check(str(values["prompt"]).strip() != "", f"{node}: the prompt is empty; describe the object, e.g. "
                                                   f"'a corgi standing up drinking boba'")


def save_last_good(error, node: str):
    """Write a DivergenceError's last good state next to the outputs; the error to raise names the file."""
    from dreamflow.errors import DivergenceError
    from dreamflow.io import claimed_output

    state = getattr(error, "last_good", None)
    if state is None:
        return DivergenceError(f"{error}; no good state was reached to save", error.step)
    try:
        with claimed_output(f"dreamflow/{node}_last_good", "safetensors") as (full, rel):
            state.save(full)
    except Exception as e:  # saving must never hide the divergence itself
        return DivergenceError(f"{error}; saving the last good state failed ({e})", error.step, state)
    return DivergenceError(
        f"{error}; the last good state is saved as '{full}': load it with DreamFlow Load State ('{rel}{OUTPUT_TAG}') "
        f"to resume from it", error.step, state)


OUTPUT_TAG = " [output]"
"""How Load State's list marks files of the output folder (ComfyUI's annotated names)."""


def check_table(table: WidgetTable, build, values: Dict[str, Any]) -> None:
    """``build(**values)``, the config a node would run (validated, every float finite), when every widget of
    ``table`` that sets a config field has a value (none is fed by a link)."""
    if known(values, *(r.name for r in table.rows if r.path is not None)):
        build(**values)



def check_state(value, cls, node: str, input_name: str, fix: str):
    """A linked state of the right stage (a NeRF where a NeRF is needed, a mesh where a mesh is)."""
    from dreamflow.state import require_state

    return require_state(value, cls, f"{node}: input '{input_name}'", fix)


def to_image(images) -> "Any":
    """Turntable views -> ComfyUI IMAGE: float32 CPU tensor [V, H, W, 3] in [0, 1]."""
    import torch

    images = torch.as_tensor(images).detach()
    if images.dim() == 3:
        images = images[None]
    check(images.dim() == 4 and images.shape[-1] == 3,
          f"preview images have shape {tuple(images.shape)}, expected [V, H, W, 3]")
    return images.to("cpu", torch.float32).clamp(0, 1).contiguous()


@contextmanager
def engine_call(free: bool = True, node: str = "", memory_hint: str = "") -> Iterator[None]:
    """Run engine work the way ComfyUI needs it.

    ComfyUI executes every node under ``torch.inference_mode()``; the stages optimise (autograd), and
    tensors made in inference mode (weights, states) could never take part in autograd later. So engine
    work runs with inference mode off and gradients on, as ComfyUI's own training node does. With
    ``free``, memory the call cached is released afterwards, also when it fails or is interrupted
    (interrupts are raised by the engine: ComfyUI's own exception when hosted, see
    ``dreamflow.hosting.raise_interrupt``).

    A stage's divergence saves its last good state beside the outputs (``save_last_good``; the error names
    the file), and running out of memory is one line naming what to lower (``memory_hint``).
    """
    import torch

    from dreamflow.errors import DivergenceError, explain_memory

    try:
        with explain_memory(node or "DreamFlow", memory_hint or "the sizes of this node's settings"), \
                torch.inference_mode(False), torch.enable_grad():
            yield
    except DivergenceError as e:
        raise save_last_good(e, node or "stage") from None
    finally:
        if free:
            hosting.free_memory()


def input_directory() -> str:
    """ComfyUI's input folder when hosted, else ``$DREAMFLOW_INPUT`` or ``./input``."""
    fp = hosting.folder_paths()
    if fp is not None:
        return fp.get_input_directory()
    return os.path.abspath(os.environ.get("DREAMFLOW_INPUT", "input"))
