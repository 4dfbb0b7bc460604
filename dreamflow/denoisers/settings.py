"""What a denoiser is loaded with: :class:`DenoiserConfig`, LoadDenoiser's widgets as one config (the node's widget
table maps each widget to a field), and :meth:`DenoiserConfig.load` for headless callers::

    refiner = DenoiserConfig("stable-diffusion-xl-refiner-1.0", memory="low_vram").load()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from ..errors import check
from .memory import MEMORY_PRESETS

#: ``dtype`` choices (weights' precision).
DTYPES = ("auto", "fp16", "bf16", "fp32")
#: ``vae_precision`` choices.
VAE_DTYPES = ("auto", "fp32", "bf16", "fp16")
#: ``device`` choices.
DEVICES = ("auto", "cuda", "cpu")
#: ``fast_path`` choices -> ``FastPathConfig.compile`` (None: eager calls).
FAST_PATHS: Dict[str, Optional[str]] = {"graphs+compile": "blocks", "graphs": "off", "off": None}


@dataclass
class DenoiserConfig:
    """A denoiser as LoadDenoiser loads it (defaults: the node's)."""

    model_name: str = ""
    """Diffusers folder (models/diffusers) or .safetensors checkpoint (models/checkpoints), or a path
    (``dreamflow.denoisers.resolve_model``)."""
    dtype: str = "auto"
    """Weights' precision: "auto" (fp16 on CUDA, fp32 on CPU), "fp16", "bf16" or "fp32"."""
    device: str = "auto"
    """"auto" (CUDA when available, else CPU), "cuda" or "cpu"."""
    cpu_offload: bool = False
    """Text encoders on the CPU, the VAE on the GPU only while used (``Denoiser.load``; the low_vram preset turns
    it on too)."""
    vae_tiling: bool = False
    """Encode / decode large images tile by tile."""
    fast_path: str = "graphs+compile"
    """CUDA only: "graphs+compile" (``Denoiser.enable_fast_path()``: CUDA graphs over compiled UNet / VAE blocks,
    fused LoRA AdamW), "graphs" (no torch.compile) or "off" (eager calls)."""
    vae_precision: str = "auto"
    """The VAE's precision (``Denoiser.load``'s ``vae_dtype``): "auto", "fp32", "bf16" or "fp16"."""
    memory: str = "default"
    """GPU memory preset (``dreamflow.denoisers.memory.MEMORY_PRESETS``): "default", or "low_vram" for small cards (README "Memory")
    (text encoders and VAE off the GPU, UNet and VAE gradient checkpointing, at most 1024^2 px of views per update:
    the refine stage then runs 1 view per update and twice the updates)."""

    def validate(self) -> "DenoiserConfig":
        for name, choices in (("dtype", DTYPES), ("device", DEVICES), ("fast_path", tuple(FAST_PATHS)),
                              ("vae_precision", VAE_DTYPES), ("memory", tuple(MEMORY_PRESETS))):
            value = getattr(self, name)
            check(value in choices, f"LoadDenoiser {name}={value!r} is unknown; use one of: {', '.join(choices)}")
        return self

    def key(self) -> Tuple:
        """What makes two loads the same model copy: every setting, except that the fast path does nothing off
        CUDA (CPU loads differing only in it share one copy)."""
        from .denoiser import resolve_device

        fast = self.fast_path if resolve_device(self.device).type == "cuda" else "off"
        return (self.model_name, self.dtype, self.device, bool(self.cpu_offload), bool(self.vae_tiling), fast,
                self.vae_precision, self.memory)

    def load(self):
        """``Denoiser.load`` with these settings, then the fast path (CUDA only)."""
        from .denoiser import Denoiser

        self.validate()
        denoiser = Denoiser.load(self.model_name, dtype=self.dtype, device=self.device,
                                 cpu_offload=bool(self.cpu_offload), vae_tiling=bool(self.vae_tiling),
                                 vae_dtype=self.vae_precision, memory=self.memory)
        return apply_fast_path(denoiser, self.fast_path)


def apply_fast_path(denoiser, fast_path: str):
    """Switch on LoadDenoiser's ``fast_path`` choice (a key of :data:`FAST_PATHS`) for a CUDA denoiser; a CPU one
    and "off" stay eager. Returns the denoiser."""
    from .fast import FastPathConfig

    if FAST_PATHS[fast_path] is not None and denoiser.device.type == "cuda":
        denoiser.enable_fast_path(FastPathConfig(compile=FAST_PATHS[fast_path]))
    return denoiser
