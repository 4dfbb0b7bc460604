"""Pretrained denoisers: loading (diffusers folders, single files), the frozen ``Denoiser``, the VSD scene LoRA.

Public API::

    from dreamflow.denoisers import Denoiser, PromptEmbeds, SceneDenoiser, SceneLoRAConfig, resolve_model, list_models
    from dreamflow.denoisers.tiny import build_tiny_sd, build_tiny_sdxl_refiner
"""

from .denoiser import Denoiser, PromptEmbeds, require_kind, resolve_device, resolve_dtype
from .loading import list_models, pick_single_file_config, resolve_model
from .scene import SceneDenoiser, SceneLoRAConfig

__all__ = [
    "Denoiser",
    "PromptEmbeds",
    "SceneDenoiser",
    "SceneLoRAConfig",
    "list_models",
    "pick_single_file_config",
    "require_kind",
    "resolve_device",
    "resolve_dtype",
    "resolve_model",
]
