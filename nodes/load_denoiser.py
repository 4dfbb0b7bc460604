"""DreamFlowLoadDenoiser: a frozen diffusion model (SD 1.x/2.x or the SDXL refiner) for the stages."""

from __future__ import annotations

import threading
import weakref

from .common import CATEGORY, DENOISER, Checked, dynamic_list, engine_call

DTYPES = ("auto", "fp16", "bf16", "fp32")
VAE_DTYPES = ("auto", "fp32", "bf16", "fp16")
#: LoadDenoiser ``fast_path`` choices -> FastPathConfig.compile (None: eager calls).
FAST_PATHS = {"graphs+compile": "blocks", "graphs": "off", "off": None}
DEVICES = ("auto", "cuda", "cpu")

# Loaded denoisers by settings. Weak values: a model lives exactly as long as some node output (ComfyUI's
# cache, or the headless run) holds it, so two loader nodes with the same settings share one copy within
# a run, and a model nobody uses any more is freed without our help.
_loaded: "weakref.WeakValueDictionary[tuple, object]" = weakref.WeakValueDictionary()
_lock = threading.Lock()


def load_shared(model_name: str, dtype: str, device: str, cpu_offload: bool, vae_tiling: bool,
                fast_path: str = "graphs+compile", vae_precision: str = "auto"):
    """``Denoiser.load`` with sharing: the same settings return the same (already loaded) object.

    ``fast_path`` (CUDA only, ignored on the CPU): "graphs+compile" = ``Denoiser.enable_fast_path()`` (CUDA graphs,
    compiled UNet / VAE blocks, fused LoRA AdamW; dreamflow/denoisers/fast.py), "graphs" = the same without
    torch.compile, "off" = eager calls.
    """
    from dreamflow.denoisers import Denoiser, resolve_device
    from dreamflow.denoisers.fast import FastPathConfig
    from dreamflow.errors import check

    check(fast_path in FAST_PATHS, f"LoadDenoiser fast_path={fast_path!r} is unknown; use one of: {', '.join(FAST_PATHS)}")
    # The fast path does nothing off CUDA: CPU loaders differing only in it share one copy.
    key_fast = fast_path if resolve_device(device).type == "cuda" else "off"
    key = (model_name, dtype, device, bool(cpu_offload), bool(vae_tiling), key_fast, vae_precision)
    with _lock:
        denoiser = _loaded.get(key)
        if denoiser is None:
            with engine_call(free=False, node="LoadDenoiser",  # weights made outside inference mode, for autograd later
                             memory_hint="the weights' size: dtype fp16 / bf16, cpu_offload, or a smaller model"):
                denoiser = Denoiser.load(model_name, dtype=dtype, device=device, cpu_offload=bool(cpu_offload),
                                         vae_tiling=bool(vae_tiling), vae_dtype=vae_precision)
                if FAST_PATHS[fast_path] is not None and denoiser.device.type == "cuda":
                    denoiser.enable_fast_path(FastPathConfig(compile=FAST_PATHS[fast_path]))
            _loaded[key] = denoiser
        return denoiser


class LoadDenoiser(Checked):
    node_name = "DreamFlowLoadDenoiser"

    @classmethod
    def INPUT_TYPES(cls):
        from dreamflow.denoisers import list_models

        return {
            "required": {
                "model_name": (list_models(), dynamic_list({
                    "tooltip": "Diffusers folder (models/diffusers) or single-file .safetensors checkpoint "
                               "(models/checkpoints): SD 1.5 / 2.1 for the NeRF and mesh stages, the SDXL refiner "
                               "for the refine stage."})),
                "dtype": (list(DTYPES), {"default": "auto",
                                         "tooltip": "Weights' precision. auto: fp16 on CUDA, fp32 on CPU; bf16 avoids "
                                                    "fp16 overflow on recent GPUs."}),
                "device": (list(DEVICES), {"default": "auto", "tooltip": "auto: CUDA when available, else CPU."}),
                "cpu_offload": ("BOOLEAN", {"default": False,
                                            "tooltip": "Keep the text encoders on the CPU and the VAE there between "
                                                       "uses: less GPU memory, slower updates."}),
                "vae_tiling": ("BOOLEAN", {"default": False,
                                           "tooltip": "Encode/decode large images tile by tile (less GPU memory at "
                                                      "1024 px, slightly slower)."}),
                "fast_path": (list(FAST_PATHS), {
                    "default": "graphs+compile",
                    "tooltip": "CUDA only. graphs+compile: UNet calls replayed from CUDA graphs over torch.compile'd "
                               "UNet / VAE blocks, fused LoRA optimiser (fastest updates; the first run of a model "
                               "in a ComfyUI session compiles for minutes). graphs: no compiling, slower updates. off: "
                               "plain eager calls. Same results up to float rounding (timings: bench/RESULTS.md)."}),
                "vae_precision": (list(VAE_DTYPES), {"default": "auto",
                                                     "tooltip": "VAE precision. auto: the model's, but bf16 (else fp32) "
                                                                "for VAEs that overflow in fp16 (SDXL refiner), as "
                                                                "ComfyUI does; fp32: exact, slower, more memory."}),
            },
        }

    RETURN_TYPES = (DENOISER,)
    RETURN_NAMES = ("denoiser",)
    OUTPUT_TOOLTIPS = ("The frozen denoiser (UNet, VAE, text encoders) that guides a DreamFlow stage.",)
    FUNCTION = "load"
    CATEGORY = f"{CATEGORY}/loaders"
    DESCRIPTION = ("Loads a Stable Diffusion 1.x/2.x model or the SDXL refiner for DreamFlow's stages. Loader nodes "
                   "with the same settings share one loaded copy.")

    def load(self, model_name, dtype, device, cpu_offload, vae_tiling, fast_path, vae_precision):
        return (load_shared(model_name, dtype, device, cpu_offload, vae_tiling, fast_path, vae_precision),)
