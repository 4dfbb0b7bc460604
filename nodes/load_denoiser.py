"""DreamFlowLoadDenoiser: a frozen diffusion model (SD 1.x/2.x or the SDXL refiner) for the stages."""

from __future__ import annotations

import dataclasses
import threading
import weakref

from dreamflow.denoisers.memory import MEMORY_PRESETS
from dreamflow.denoisers.settings import DEVICES, DTYPES, FAST_PATHS, VAE_DTYPES, DenoiserConfig

from .common import CATEGORY, DENOISER, Checked, check_table, dynamic_list, engine_call
from .widgets import Widget, WidgetTable


def _models():
    from dreamflow.denoisers import list_models

    return list_models()


#: The node's widgets, in saved-workflow order: one row each (name, DenoiserConfig field, tooltip); model_name sets
#: DenoiserConfig.model_name too, but has no default (a list of this machine's files: ComfyUI shows the first).
WIDGETS = WidgetTable(
    Widget("model_name", kind="COMBO", choices=_models, options=dynamic_list({}),  # no default: the first model
           tooltip="Diffusers folder (models/diffusers) or single-file .safetensors checkpoint (models/checkpoints): SD "
                   "1.5 / 2.1 for the NeRF and mesh stages, the SDXL refiner for the refine stage."),
    Widget("dtype", "dtype", "COMBO", choices=DTYPES,
           tooltip="Weights' precision. auto: fp16 on CUDA, fp32 on CPU; bf16 avoids fp16 overflow on recent GPUs."),
    Widget("device", "device", "COMBO", choices=DEVICES, tooltip="auto: CUDA when available, else CPU."),
    Widget("cpu_offload", "cpu_offload", "BOOLEAN",
           tooltip="Keep the text encoders on the CPU and the VAE there between uses: less GPU memory, slower "
                   "updates."),
    Widget("vae_tiling", "vae_tiling", "BOOLEAN",
           tooltip="Encode/decode large images tile by tile (less GPU memory at 1024 px, slightly slower)."),
    Widget("fast_path", "fast_path", "COMBO", choices=tuple(FAST_PATHS),
           tooltip="CUDA only. graphs+compile: UNet calls replayed from CUDA graphs over torch.compile'd UNet / VAE "
                   "blocks, fused LoRA optimiser (fastest updates; the first run of a model in a ComfyUI session "
                   "compiles for minutes). graphs: no compiling, slower updates. off: plain eager calls. Same "
                   "results up to float rounding (timings: bench/RESULTS.md)."),
    Widget("vae_precision", "vae_precision", "COMBO", choices=VAE_DTYPES,
           tooltip="VAE precision. auto: the model's, but bf16 (else fp32) for VAEs that overflow in fp16 (SDXL "
                   "refiner), as ComfyUI does; fp32: exact, slower, more memory."),
)
#: Widgets added after workflows were saved: optional inputs, so a workflow saved without them loads headless too
#: (ComfyUI's frontend shows them as widgets all the same, after the others, with their defaults).
OPTIONAL_WIDGETS = WidgetTable(
    Widget("memory", "memory", "COMBO", choices=tuple(MEMORY_PRESETS),
           tooltip="GPU memory preset. default: everything on the GPU, fastest. low_vram: for small cards: text "
                   "encoders on the CPU, the VAE on the GPU only while a stage runs, UNet and VAE gradient "
                   "checkpointing, and at most 1024x1024 px of views per update (the SDXL refine stage then runs 1 "
                   "view per update and twice the updates: same view-updates, slower). README 'Memory' lists the "
                   "preset per card size."),
)

# Loaded denoisers by settings. Weak values: a model lives exactly as long as some node output (ComfyUI's
# cache, or the headless run) holds it, so two loader nodes with the same settings share one copy within
# a run, and a model nobody uses any more is freed without our help.
_loaded: "weakref.WeakValueDictionary[tuple, object]" = weakref.WeakValueDictionary()
_lock = threading.Lock()


def load_shared(config: DenoiserConfig):
    """``config.load()`` with sharing: the same settings (``DenoiserConfig.key``) return the same loaded object."""
    config.validate()
    key = config.key()
    with _lock:
        denoiser = _loaded.get(key)
        if denoiser is None:
            with engine_call(free=False, node="LoadDenoiser",  # weights made outside inference mode, for autograd later
                             memory_hint="the weights' size: dtype fp16 / bf16, cpu_offload, memory low_vram, or a "
                                         "smaller model"):
                denoiser = config.load()
            _loaded[key] = denoiser
        return denoiser


class LoadDenoiser(Checked):
    node_name = "DreamFlowLoadDenoiser"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": WIDGETS.inputs(DenoiserConfig()), "optional": OPTIONAL_WIDGETS.inputs(DenoiserConfig())}

    RETURN_TYPES = (DENOISER,)
    RETURN_NAMES = ("denoiser",)
    OUTPUT_TOOLTIPS = ("The frozen denoiser (UNet, VAE, text encoders) that guides a DreamFlow stage.",)
    FUNCTION = "load"
    CATEGORY = f"{CATEGORY}/loaders"
    DESCRIPTION = ("Loads a Stable Diffusion 1.x/2.x model or the SDXL refiner for DreamFlow's stages. Loader nodes "
                   "with the same settings share one loaded copy.")

    @classmethod
    def build_config(cls, **widgets) -> DenoiserConfig:
        widgets = {k: v for k, v in widgets.items() if v is not None}  # an optional widget not saved: its default
        config = (WIDGETS + OPTIONAL_WIDGETS).config(DenoiserConfig, widgets)
        return dataclasses.replace(config, model_name=widgets.get("model_name", config.model_name))

    @classmethod
    def check_values(cls, values):
        check_table(WIDGETS, cls.build_config, values)

    @WIDGETS.method(optional=OPTIONAL_WIDGETS.names)
    def load(self, **widgets):
        return (load_shared(self.build_config(**widgets)),)
