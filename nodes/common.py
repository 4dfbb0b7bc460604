"""What every DreamFlow node shares: custom types, widget specs read from engine configs, the wrapper
of engine calls (autograd inside ComfyUI's inference mode, memory), folders, and a state-type check.

Nodes stay thin: widgets map to config fields, one engine call does the work. Widget defaults are read
from the engine's config dataclasses, so the defaults users see are the engine's (paper) defaults.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Dict, Iterator

from dreamflow import hosting
from dreamflow.hosting import DYNAMIC_LIST
from dreamflow.errors import check
from dreamflow.guidance import METHODS  # the dropdown's order: DreamFlow's APFO first

# Custom types carried between nodes. Namespaced so they never meet core types (MESH, MODEL, ...).
DENOISER = "DREAMFLOW_DENOISER"
NERF = "DREAMFLOW_NERF"
MESH = "DREAMFLOW_MESH"
CATEGORY = "DreamFlow"

SEED_MAX = 0xFFFFFFFFFFFFFFFF  # ComfyUI's KSampler seed range


def dynamic_list(options: Dict[str, Any]) -> Dict[str, Any]:
    """Mark a dropdown filled from this machine's files (models, states); see ``dreamflow.hosting.DYNAMIC_LIST``."""
    return {**options, DYNAMIC_LIST: True}


def field_default(config: Any, path: str) -> Any:
    """The value at dotted ``path`` of a config instance (``"guidance.cfg_scale"``)."""
    value = config
    for part in path.split("."):
        value = getattr(value, part)
    return value


def int_input(config: Any, path: str, lo: int, hi: int, tooltip: str, step: int = 1, **extra) -> tuple:
    return ("INT", {"default": int(field_default(config, path)), "min": lo, "max": hi, "step": step,
                    "tooltip": tooltip, **extra})


def float_input(config: Any, path: str, lo: float, hi: float, step: float, tooltip: str) -> tuple:
    return ("FLOAT", {"default": float(field_default(config, path)), "min": lo, "max": hi, "step": step,
                      "round": False, "tooltip": tooltip})


def seed_input(config: Any, tooltip: str = "Seed of the cameras, noise and initialisation; the same seed "
                                           "and settings reproduce a run on the same device.") -> tuple:
    return ("INT", {"default": int(field_default(config, "seed")), "min": 0, "max": SEED_MAX,
                    "control_after_generate": True, "tooltip": tooltip})


def prompt_inputs(default_prompt: str = "") -> Dict[str, tuple]:
    """The prompt widgets of the stage that starts from text (NeRFStage)."""
    return {
        "prompt": ("STRING", {"multiline": True, "default": default_prompt, "dynamicPrompts": False,
                              "tooltip": "What the object is. View words (front / side / back / overhead view) are "
                                         "appended per camera."}),
        "negative_prompt": ("STRING", {"multiline": True, "default": "", "dynamicPrompts": False,
                                       "tooltip": "What to avoid (classifier-free guidance's unconditional prompt); "
                                                  "may stay empty."}),
    }


def prompt_override_inputs() -> Dict[str, tuple]:
    """The prompt widgets of a stage continuing a state (MeshStage, SDXLRefine): empty = the state's prompts."""
    return {
        "prompt": ("STRING", {"multiline": True, "default": "", "dynamicPrompts": False,
                              "tooltip": "Empty (default): the prompt the mesh carries from the NeRF stage, typed "
                                         "once. Text here overrides it for this stage (logged when it differs)."}),
        "negative_prompt": ("STRING", {"multiline": True, "default": "", "dynamicPrompts": False,
                                       "tooltip": "Empty (default): the mesh's negative prompt from the NeRF stage. "
                                                  "Text here overrides it for this stage."}),
    }


def guidance_inputs(config: Any) -> Dict[str, tuple]:
    """method, cfg_scale, t_start, t_end, updates_per_t: the knobs of a stage config's ``guidance``."""
    return {
        "method": (list(METHODS), {"default": field_default(config, "guidance.method"),
                                   "tooltip": "apfo: DreamFlow's approximate probability flow (decreasing t schedule); "
                                              "sds: DreamFusion score distillation; vsd: ProlificDreamer variational "
                                              "score distillation (scene LoRA)."}),
        "cfg_scale": float_input(config, "guidance.cfg_scale", 1.0, 100.0, 0.5,
                                 "Classifier-free guidance scale (1 = off). APFO/VSD use ~7.5; SDS needs ~100."),
        "t_start": float_input(config, "guidance.t_start", 0.0, 1.0, 0.01,
                               "Largest diffusion time, as a fraction of the 1000 training steps. APFO starts here and "
                               "decreases to t_end; SDS/VSD sample t in [t_end, t_start]. Must exceed t_end."),
        "t_end": float_input(config, "guidance.t_end", 0.0, 1.0, 0.01,
                             "Smallest diffusion time (fraction of 1000 steps); where APFO's schedule ends."),
        "updates_per_t": int_input(config, "guidance.updates_per_t", 1, 1000,
                                   "APFO: updates sharing one timestep of the schedule, each on new random views "
                                   "(the ODE step is amortised over views)."),
    }


def denoise_resolution_input(config: Any) -> tuple:
    return int_input(config, "denoise_resolution", 8, 4096,
                     "Size the renders are resized to before the denoiser's VAE encodes them, pixels: the "
                     "denoiser's native size (SD 1.5 / 2.1-base: 512, SD 2.1: 768, SDXL refiner: 1024).", step=8)


def lr_lora_input(config: Any) -> tuple:
    return float_input(config, "guidance.lora.lr", 0.0, 1.0, 0.00001,
                       "APFO/VSD: Adam learning rate of the scene LoRA that models the current scene "
                       "(threestudio VSD: 1e-4); unused by SDS.")


def mesh_inputs(config: Any) -> Dict[str, tuple]:
    """Learning rates and regulariser weights shared by the mesh stage and SDXL refine."""
    return {
        "lr_geometry": float_input(config, "lr_geometry", 0.0, 1.0, 0.0001,
                                   "Adam learning rate of the bounded vertex offsets (threestudio: 0.005)."),
        "lr_grid": float_input(config, "lr_grid", 0.0, 1.0, 0.0001,
                               "Adam learning rate of the colour field's hash grid (threestudio: 0.01)."),
        "lr_mlp": float_input(config, "lr_mlp", 0.0, 1.0, 0.0001,
                              "Adam learning rate of the colour MLP (threestudio: 0.001)."),
        "lr_lora": lr_lora_input(config),
        "lambda_normal_consistency": float_input(config, "lambda_normal_consistency", 0.0, 1e7, 100.0,
                                                 "Weight of the normal-consistency smoothness between adjacent faces "
                                                 "(threestudio: 10000); applies when the geometry moves."),
        "lambda_laplacian": float_input(config, "lambda_laplacian", 0.0, 1e7, 100.0,
                                        "Weight of the Laplacian smoothness of the vertex offsets (threestudio: "
                                        "10000); applies when the geometry moves."),
    }


def mesh_changes(lr_geometry, lr_grid, lr_mlp, lambda_normal_consistency, lambda_laplacian) -> Dict[str, Any]:
    return {"lr_geometry": lr_geometry, "lr_grid": lr_grid, "lr_mlp": lr_mlp,
            "lambda_normal_consistency": lambda_normal_consistency, "lambda_laplacian": lambda_laplacian}


def preview_inputs() -> Dict[str, tuple]:
    return {
        "preview_views": ("INT", {"default": 8, "min": 1, "max": 64,
                                  "tooltip": "Views of the turntable preview image batch (azimuths evenly spaced)."}),
        "preview_resolution": ("INT", {"default": 256, "min": 16, "max": 2048, "step": 16,
                                       "tooltip": "Width = height of each preview view, pixels."}),
    }


def guidance_changes(method: str, cfg_scale: float, t_start: float, t_end: float, updates_per_t: int,
                     lr_lora: float) -> Dict[str, Any]:
    """Dotted config changes for :func:`dreamflow.config.replace` from the guidance widgets."""
    return {"guidance.method": method, "guidance.cfg_scale": cfg_scale, "guidance.t_start": t_start,
            "guidance.t_end": t_end, "guidance.updates_per_t": updates_per_t, "guidance.lora.lr": lr_lora}


def make_config(cls, **changes):
    """``cls()`` with ``changes`` (dotted keys for nested configs), validated: bad values raise before work."""
    from dreamflow.config import replace

    return replace(cls(), **changes).validate()


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
def engine_call(free: bool = True) -> Iterator[None]:
    """Run engine work the way ComfyUI needs it.

    ComfyUI executes every node under ``torch.inference_mode()``; the stages optimise (autograd), and
    tensors made in inference mode (weights, states) could never take part in autograd later. So engine
    work runs with inference mode off and gradients on, as ComfyUI's own training node does. With
    ``free``, memory the call cached is released afterwards, also when it fails or is interrupted
    (interrupts are raised by the engine: ComfyUI's own exception when hosted, see
    ``dreamflow.hosting.raise_interrupt``).
    """
    import torch

    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        if free:
            hosting.free_memory()


def input_directory() -> str:
    """ComfyUI's input folder when hosted, else ``$DREAMFLOW_INPUT`` or ``./input``."""
    fp = hosting.folder_paths()
    if fp is not None:
        return fp.get_input_directory()
    return os.path.abspath(os.environ.get("DREAMFLOW_INPUT", "input"))
