"""GPU memory presets of a denoiser and the stages that use it: ``MemoryConfig`` and ``MEMORY_PRESETS``.

LoadDenoiser's ``memory`` widget (and ``Denoiser.load(..., memory=...)`` headless) picks a preset by name:

* ``"default"``: everything on the GPU, activations kept for the backward (fastest; bench/RESULTS.md gives the
  paper pipeline's peak per stage).
* ``"low_vram"``: a 12 GB card. Every lever below is on; each field's docstring says what it saves, what it
  costs and why its value was chosen. Measured per stage by ``bench/bench_lowvram.py`` (bench/RESULTS.md).

The preset travels with the denoiser (``Denoiser.memory``): the denoiser applies the levers that are its own
(where the text encoders and the VAE live, gradient checkpointing), and every stage run with it applies
``max_view_pixels`` (``dreamflow.stages.common.fit_views``: fewer views per update, proportionally more updates).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Dict, Tuple, Union

import torch
import torch.utils.checkpoint

from ..errors import DreamFlowError, check

log = logging.getLogger("dreamflow")


@dataclass
class MemoryConfig:
    """How a denoiser and the stages run with it spend GPU memory. The defaults are the ``"default"`` preset; the
    ``"low_vram"`` values and their reasons are given per field (``MEMORY_PRESETS``)."""

    cpu_offload: bool = False
    """Text encoders on the CPU in float32 (each distinct prompt string is encoded once; its embeddings are cached
    on the GPU) and the VAE on the GPU only while a stage runs (or one encode / decode call). Same as LoadDenoiser's
    ``cpu_offload`` (either turns it on). low_vram: on. The text encoders are needed once per prompt string but
    otherwise sit on the GPU for good (SD 2.1's OpenCLIP-H, the refiner's OpenCLIP-bigG: the refiner's is the
    larger); cost: CPU time per new prompt string, a VAE transfer per stage, and no compiled VAE encoder blocks
    (the fast path skips them with offload; bench/RESULTS.md run 6, "Stage 3 options")."""
    vae_checkpointing: Union[str, bool] = "auto"
    """VAE encoder gradient checkpointing (``Denoiser(vae_checkpointing=...)``; "auto": on for cards under
    ``VAE_CHECKPOINTING_BELOW_GIB``, else for 1024 px encodes only). low_vram: True, every encode: a card that needs
    this preset is below that anyway, and saying so explicitly makes a big card measure what the small one runs (the encode's activations are
    the largest saving of all, at one recomputed encoder forward per update; run 6, "Stage 3 options")."""
    unet_checkpointing: bool = False
    """Gradient checkpointing of the UNet's blocks (diffusers ``enable_gradient_checkpointing``) for the scene
    LoRA's training step, the one UNet call with gradients: its backward recomputes each block's forward instead
    of keeping every activation from the forward (the frozen CFG and scene predictions run without gradients and
    are unaffected). The recomputation runs with the scene LoRA switched on (``SceneDenoiser.backward_scope``), as
    its forward did. low_vram: on. Without it the LoRA step keeps the activations of a whole UNet forward at the
    stage's latent size until its backward (with the fast path they live in the training graph's memory pool for
    good); cost: one more UNet forward per LoRA step."""
    max_view_pixels: int = 0
    """The most pixels per update that go through the VAE and the UNet: ``views_per_update x
    denoise_resolution^2``. A stage whose setting exceeds it runs fewer views per update (the largest divisor of
    ``views_per_update`` that fits, at least 1) and proportionally more updates (``iterations`` and APFO's
    ``updates_per_t`` times the same factor): the same view-updates and the same timestep schedule, each update's
    gradient from fewer views (logged; the state records the settings run). 0 = no limit. low_vram: 2 x 512^2 =
    524,288 px: the NeRF and mesh stages run 2 views at 512 px instead of 4 (twice the updates), the refine stage 1
    view at 1024 px instead of 2 (2,000 updates instead of 1,000): each halves the per-update activations of the
    VAE encode, the UNet calls and the renders. Why 2 views in stages 1-2: with 4 views (the preset's first value,
    1024^2) the NeRF stage ran out of memory on the device under the preset's cap and the mesh stage fitted with
    no margin (measured: README "Memory")."""

    expandable_segments: bool = False
    """PyTorch's caching allocator maps GPU memory in growable segments (``expandable_segments:True``, set when
    a denoiser with this preset loads on a CUDA device, for the whole process) instead of fixed blocks that a
    changing mix of tensor sizes fragments. low_vram: on. Under the low_vram benchmark's cap the refine stage (1
    view at 1024 px) ran out of memory with fixed blocks and fitted with growable ones (bench/RESULTS.md, issue 17).
    Where the process already runs CUDA's own asynchronous allocator (``backend:cudaMallocAsync``, ComfyUI's
    default on CUDA builds of torch), that pool already maps memory on demand and nothing is changed; nor where
    the user's ``PYTORCH_CUDA_ALLOC_CONF`` sets ``expandable_segments`` itself (either way)."""

    def validate(self) -> "MemoryConfig":
        check(self.vae_checkpointing in ("auto", True, False),
              f"memory vae_checkpointing={self.vae_checkpointing!r} is unknown; use 'auto', True or False")
        check(isinstance(self.max_view_pixels, int) and self.max_view_pixels >= 0,
              f"memory max_view_pixels={self.max_view_pixels!r} must be an integer >= 0 (0 = no limit)")
        return self


#: Presets by name (LoadDenoiser's ``memory`` choices, in dropdown order).
MEMORY_PRESETS: Dict[str, MemoryConfig] = {
    "default": MemoryConfig(),
    "low_vram": MemoryConfig(cpu_offload=True, vae_checkpointing=True, unet_checkpointing=True,
                             max_view_pixels=2 * 512 * 512, expandable_segments=True),
}


def memory_config(value: Union[str, MemoryConfig, None] = "default") -> MemoryConfig:
    """A preset by name (a copy), or a ``MemoryConfig`` as given (validated); None = "default"."""
    if value is None:
        value = "default"
    if isinstance(value, MemoryConfig):
        return value.validate()
    if value not in MEMORY_PRESETS:
        raise DreamFlowError(f"memory preset {value!r} is unknown; use one of: {', '.join(MEMORY_PRESETS)}")
    return dataclasses.replace(MEMORY_PRESETS[value])


def preset_name(config: MemoryConfig) -> str:
    """The preset ``config`` equals ("custom" if none)."""
    return next((name for name, preset in MEMORY_PRESETS.items() if preset == config), "custom")


def _set_allocator_settings(text: str) -> None:
    """PYTORCH_CUDA_ALLOC_CONF-style settings at run time (torch >= 2.9 names the call ``_accelerator_...``; the
    older ``torch.cuda.memory._set_allocator_settings`` warns there)."""
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    setter(text)


def apply_allocator(config: MemoryConfig, device: torch.device) -> str:
    """Set the process's CUDA allocator as ``config`` asks (``expandable_segments``); returns what was done:
    "expandable" (turned on now), "already" (on before, or the cudaMallocAsync backend), "user" (the user's
    ``PYTORCH_CUDA_ALLOC_CONF`` names ``expandable_segments`` itself, e.g. ``:False``: their choice stands) or
    "unchanged"."""
    if not config.expandable_segments or torch.device(device).type != "cuda":
        return "unchanged"
    if torch.cuda.get_allocator_backend() != "native":  # cudaMallocAsync maps memory on demand itself
        return "already"
    env = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").replace(" ", "").lower()
    if "expandable_segments:true" in env:
        return "already"
    if "expandable_segments:" in env:
        log.info("dreamflow: PYTORCH_CUDA_ALLOC_CONF sets expandable_segments; the memory preset leaves it as it is")
        return "user"
    _set_allocator_settings("expandable_segments:True")
    log.info("dreamflow: CUDA allocator set to expandable segments (memory preset)")
    return "expandable"


def views_that_fit(views: int, denoise_resolution: int, config: MemoryConfig) -> Tuple[int, int]:
    """``(views', factor)``: views per update within ``config.max_view_pixels`` and the factor ``views / views'``
    by which the updates grow (``views'`` divides ``views``, so the view-updates stay exactly the same)."""
    views = int(views)
    if config.max_view_pixels <= 0 or views * denoise_resolution ** 2 <= config.max_view_pixels:
        return views, 1
    fit = max(1, config.max_view_pixels // denoise_resolution ** 2)
    best = max(d for d in range(1, min(fit, views) + 1) if views % d == 0)
    return best, views // best


def checkpoint_call(module, *args):
    """diffusers' ``gradient_checkpointing_func`` for the UNet: non-reentrant checkpointing (works when no input
    requires grad: only the LoRA weights do) that neither saves nor restores the RNG state. The frozen UNet draws no
    random numbers (eval mode, no dropout; peft's LoRA dropout is 0), and the fast path captures the LoRA step in a
    CUDA graph, where reading and setting the CUDA generator's state would be captured as fixed values."""
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, preserve_rng_state=False)

