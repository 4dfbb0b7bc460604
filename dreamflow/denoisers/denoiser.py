"""The pretrained denoiser every guidance method uses: a frozen Stable Diffusion (or SDXL refiner) behind one API.

Notation (DDPM / Ho et al. 2020, as in the APFO paper): ``a = alpha_bar(t)`` is the cumulative signal fraction,
``x_t = sqrt(a) x_0 + sqrt(1 - a) eps``, the v-target is ``v = sqrt(a) eps - sqrt(1 - a) x_0`` (Salimans & Ho
2022), and the EDM noise level is ``sigma = sqrt((1 - a) / a)`` (Karras et al. 2022; ``x_t / sqrt(a) = x_0 + sigma eps``).
Time is continuous, ``t`` in [0, 1], mapped to the UNet's training timestep ``t * (T - 1)`` (T = 1000), with
``alpha_bar`` linearly interpolated between the scheduler's ``alphas_cumprod`` entries.

Tensors: latents / noise ``[B, C, h, w]`` (C = 4, h = H / 8 for SD), any float dtype; outputs follow the input's
dtype and the UNet runs in ``Denoiser.dtype`` internally. ``t``: a float, a 0-d tensor or ``[B]``.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from .. import hosting
from ..errors import DreamFlowError
from .loading import LoadedComponents, load_components, resolve_model, weights_bytes
from .memory import MemoryConfig, apply_allocator, checkpoint_call, memory_config, preset_name

log = logging.getLogger("dreamflow")

Tensor = torch.Tensor
KINDS = {"sd": "Stable Diffusion 1.x/2.x", "sdxl_refiner": "SDXL refiner"}
#: Refiner micro-conditioning defaults (diffusers StableDiffusionXLImg2ImgPipeline: aesthetic_score=6.0,
#: negative_aesthetic_score=2.5).
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5
_DTYPES = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


@dataclass
class PromptEmbeds:
    """Text conditioning for a batch of B views (one prompt each) and its classifier-free-guidance pair.

    Tensors live on the denoiser's device in its dtype.
    """

    cond: Tensor
    """[B, 77, D] text encoder hidden states of the prompts (D = UNet cross_attention_dim)."""
    uncond: Tensor
    """[B, 77, D] the same for the negative prompt ("" by default)."""
    pooled_cond: Optional[Tensor] = None
    """[B, P] SDXL refiner only: text_encoder_2's pooled, projected output."""
    pooled_uncond: Optional[Tensor] = None
    """[B, P] SDXL refiner only, negative prompt."""
    time_ids_cond: Optional[Tensor] = None
    """[B, 5] refiner micro-conditioning: (orig_h, orig_w, crop_top, crop_left, aesthetic score 6.0)."""
    time_ids_uncond: Optional[Tensor] = None
    """[B, 5] the same with the negative aesthetic score 2.5."""

    def __len__(self) -> int:
        return int(self.cond.shape[0])

    def _map(self, fn) -> "PromptEmbeds":
        return PromptEmbeds(**{f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name)))
                               for f in fields(self)})

    def index(self, idx: Union[int, slice, Sequence[int], Tensor]) -> "PromptEmbeds":
        """Select views (an int keeps the batch dimension)."""
        if isinstance(idx, int):
            idx = [idx]
        if isinstance(idx, (list, tuple)):
            idx = torch.as_tensor(idx, dtype=torch.long, device=self.cond.device)
        return self._map(lambda t: t[idx])

    def to(self, device=None, dtype=None) -> "PromptEmbeds":
        return self._map(lambda t: t.to(device=device, dtype=dtype))

    @staticmethod
    def cat(items: Sequence["PromptEmbeds"]) -> "PromptEmbeds":
        """Concatenate batches (all from the same denoiser)."""
        first = items[0]
        return PromptEmbeds(**{f.name: (None if getattr(first, f.name) is None
                                        else torch.cat([getattr(e, f.name) for e in items]))
                               for f in fields(first)})


def resolve_device(device: Union[str, torch.device] = "auto") -> torch.device:
    """``"auto"``: CUDA if available, else CPU."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise DreamFlowError(f"device {device!r} is not a torch device; use 'auto', 'cpu' or 'cuda[:N]'") from None


def resolve_dtype(dtype: Union[str, torch.dtype] = "auto", device: torch.device = torch.device("cpu")) -> torch.dtype:
    """``"auto"``: float16 on CUDA, float32 on CPU; also "fp16", "bf16", "fp32" or a ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise DreamFlowError(f"dtype {dtype} is not supported; use float16, bfloat16 or float32")
        return dtype
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise DreamFlowError(f"dtype {dtype!r} is unknown; use one of: auto, {', '.join(sorted(set(_DTYPES)))}")
    return _DTYPES[dtype]


def resolve_vae_dtype(vae_dtype: Union[str, torch.dtype], dtype: torch.dtype, force_upcast: bool,
                      device: torch.device) -> torch.dtype:
    """The VAE's dtype. ``"auto"``: the model's ``dtype``, except a float16 model whose VAE overflows in float16
    (``force_upcast`` in its config: the SDXL / refiner VAE) gets bfloat16 where the GPU supports it (same range
    as float32; ComfyUI 0.3.64 runs these VAEs in bfloat16 by default: ``comfy/sd.py`` working_dtypes
    [bfloat16, float32]) and float32 otherwise; float32 makes the refiner's 1024 px encode + backward far slower and
    heavier (bench/RESULTS.md run 3). "fp32", "bf16", "fp16" or a torch.dtype force one."""
    if vae_dtype == "auto":
        if dtype == torch.float16 and force_upcast:
            bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            return torch.bfloat16 if bf16 else torch.float32
        return dtype
    if not isinstance(vae_dtype, torch.dtype) and vae_dtype not in _DTYPES:
        raise DreamFlowError(f"vae_dtype={vae_dtype!r} is unknown; use one of: auto, fp32, bf16, fp16")
    return resolve_dtype(vae_dtype, device)


#: "auto" VAE checkpointing turns on for every encode below this much GPU memory (GiB): the refine stage's
#: 2 x 1024 px encode + backward keeps a large share of a 40 GiB card in VAE activations (bench/RESULTS.md run 3).
VAE_CHECKPOINTING_BELOW_GIB = 40.0
#: ... and, on bigger cards, for encodes of images this large (px per side): the refine stage's 1024 px views,
#: whose VAE activations alone would break the 20 GB budget of issue 6 (the NeRF / mesh stages' 512 px encodes
#: keep their activations: recomputing them costs more than their memory is worth there).
VAE_CHECKPOINTING_MIN_PX = 1024


def resolve_vae_checkpointing(value: Union[str, bool], device: torch.device) -> Union[bool, str]:
    """Gradient checkpointing of the VAE encoder (``vae.enable_gradient_checkpointing()``: the encoder's blocks
    recompute their activations in the backward). "auto": on for CUDA devices with less than
    ``VAE_CHECKPOINTING_BELOW_GIB`` of memory; on bigger CUDA devices ``"large"`` (only for images of at least
    ``VAE_CHECKPOINTING_MIN_PX`` per side, decided per encode); off on the CPU (it has the RAM)."""
    if isinstance(value, bool):
        return value
    if value != "auto":
        raise DreamFlowError(f"vae_checkpointing={value!r} is unknown; use 'auto', True or False")
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    total = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
    return True if total < VAE_CHECKPOINTING_BELOW_GIB else "large"


def _freeze(m: Optional[torch.nn.Module]) -> Optional[torch.nn.Module]:
    if m is not None:
        m.eval()
        m.requires_grad_(False)
    return m


def _to(m: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move and cast. diffusers' ``ModelMixin.to`` warns on every dtype cast even when the model keeps no module
    in float32 (0.42); such models are cast with plain ``nn.Module.to``."""
    p = next(m.parameters(), None)
    if p is not None and p.dtype != dtype:
        if getattr(m, "_keep_in_fp32_modules", None):
            m.to(dtype=dtype)
        else:
            torch.nn.Module.to(m, dtype=dtype)
    return m.to(device)


def alphas_cumprod_from_config(scheduler_config: dict) -> Tensor:
    """``alphas_cumprod`` [T] (float32) exactly as diffusers' DDPMScheduler computes it from the config's betas."""
    from diffusers import DDPMScheduler

    allowed = set(inspect.signature(DDPMScheduler.__init__).parameters)
    cfg = {k: v for k, v in scheduler_config.items() if k in allowed}
    return DDPMScheduler(**cfg).alphas_cumprod.to(torch.float32)




class Denoiser:
    """A frozen pretrained latent diffusion model: prompts -> embeddings, images <-> latents, x_t -> eps.

    Attributes:
        kind: "sd" (SD 1.x/2.x and the toy prior) or "sdxl_refiner".
        name: what the user asked for; ``path`` the folder or file that was loaded.
        unet, vae, text_encoder, tokenizer (SD) / text_encoder_2, tokenizer_2 (refiner): frozen modules.
        prediction_type: "epsilon" or "v_prediction" (from the scheduler config).
        alphas_cumprod: [T] float32 on ``device``.
        device, dtype: where and in which precision the UNet runs.
        latent_channels, vae_scale_factor, native_resolution: 4, 8, 512 / 768 / 1024 px for the released models.
        memory: the :class:`~dreamflow.denoisers.memory.MemoryConfig` (a preset of ``MEMORY_PRESETS``); the
            stages run with this denoiser read its ``max_view_pixels``.
        unet_checkpointing: the UNet recomputes its blocks' activations in the scene LoRA's backward.
    """

    def __init__(self, components: LoadedComponents, name: str, device: torch.device, dtype: torch.dtype,
                 cpu_offload: bool = False, vae_slicing: bool = False, vae_tiling: bool = False,
                 vae_dtype: Union[str, torch.dtype] = "auto", vae_checkpointing: Union[str, bool] = "auto",
                 memory: Union[str, MemoryConfig] = "default"):
        self.kind = components.kind
        self.name = name
        self.path = components.path
        self.device = device
        self.dtype = dtype
        self.memory = memory_config(memory)
        apply_allocator(self.memory, device)
        self.cpu_offload = bool(cpu_offload) or self.memory.cpu_offload
        self.model_index = components.model_index
        self.unet = _to(_freeze(components.unet), device, dtype)
        vae = _freeze(components.vae)
        self.vae_dtype = resolve_vae_dtype(vae_dtype, dtype, bool(vae.config.get("force_upcast", False)), device)
        self._vae_home = torch.device("cpu") if self.cpu_offload else device
        self.vae = _to(vae, self._vae_home, self.vae_dtype)
        if isinstance(vae_checkpointing, str) and vae_checkpointing == "auto":
            vae_checkpointing = self.memory.vae_checkpointing  # the preset's; "auto" unless low_vram
        self.vae_checkpointing = resolve_vae_checkpointing(vae_checkpointing, device)
        if self.vae_checkpointing:
            self.vae.enable_gradient_checkpointing()
        if vae_slicing:
            self.vae.enable_slicing()
        if vae_tiling:
            self.vae.enable_tiling()
        self.unet_checkpointing = self.memory.unet_checkpointing
        if self.unet_checkpointing:  # only calls with gradients recompute (the scene LoRA's training step)
            self.unet.enable_gradient_checkpointing(checkpoint_call)
        # With cpu_offload the text encoders stay on the CPU in float32: each new prompt costs CPU time once
        # (results are cached), and the GPU never holds them.
        self._text_device = torch.device("cpu") if self.cpu_offload else device
        self._text_dtype = torch.float32 if self.cpu_offload else dtype
        self.text_encoder = _freeze(components.text_encoder)
        self.text_encoder_2 = _freeze(components.text_encoder_2)
        for te in (self.text_encoder, self.text_encoder_2):
            if te is not None:
                _to(te, self._text_device, self._text_dtype)
        self.tokenizer = components.tokenizer
        self.tokenizer_2 = components.tokenizer_2
        cfg = components.scheduler_config
        self.prediction_type = cfg.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise DreamFlowError(f"'{self.path}' predicts {self.prediction_type!r}; DreamFlow supports epsilon and "
                                 f"v_prediction models")
        self.alphas_cumprod = alphas_cumprod_from_config(cfg).to(device)
        self.num_train_timesteps = int(self.alphas_cumprod.shape[0])
        self.latent_channels = int(self.vae.config.latent_channels)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.native_resolution = int(self.unet.config.sample_size) * self.vae_scale_factor
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.shift_factor = float(self.vae.config.get("shift_factor", None) or 0.0)
        self.force_zeros_for_empty_prompt = bool(self.model_index.get("force_zeros_for_empty_prompt", False))
        self._prompt_cache: Dict[str, Tuple[Tensor, Optional[Tensor]]] = {}
        #: Opt-in CUDA fast path (CUDA graphs, fused LoRA AdamW; dreamflow/denoisers/fast.py); None = eager.
        self.fast_path = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, name_or_path: str, dtype: Union[str, torch.dtype] = "auto", device: Union[str, torch.device] = "auto",
             cpu_offload: bool = False, vae_slicing: bool = False, vae_tiling: bool = False,
             vae_dtype: Union[str, torch.dtype] = "auto", vae_checkpointing: Union[str, bool] = "auto",
             memory: Union[str, MemoryConfig] = "default") -> "Denoiser":
        """Resolve ``name_or_path`` (:func:`resolve_model`) and load it.

        Args:
            name_or_path: a model name (ComfyUI ``models/diffusers``, ``models/checkpoints``, the repo's ``models/``)
                or a path to a diffusers folder / ``.safetensors`` checkpoint.
            dtype: "auto" (float16 on CUDA, float32 on CPU), "fp16", "bf16", "fp32" or a torch.dtype.
            device: "auto" (CUDA if available, else CPU) or a torch device.
            cpu_offload: keep the text encoders on the CPU (float32) and move the VAE to the GPU only while it
                is used (a whole stage, see ``vae_resident``, or one encode/decode call outside stages). Saves
                ~0.25 GB (SD 1.5) to ~1.6 GB (refiner) of GPU memory; costs a VAE transfer (~170 MB in float16,
                a few ms over PCIe 4) per stage or call, and CPU text encoding
                of each new prompt (cached).
            vae_slicing: decode/encode a batch one image at a time (less memory, same result).
            vae_tiling: encode/decode large images in overlapping tiles (less memory; seams are blended).
            vae_dtype: the VAE's precision, see :func:`resolve_vae_dtype` ("auto": the model's, except that a VAE
                that overflows in float16 (``force_upcast``, the SDXL VAE) runs in bfloat16 on GPUs that have it,
                as ComfyUI does, else float32); "fp32", "bf16", "fp16" force one.
            vae_checkpointing: recompute the VAE encoder's activations in the stages' backward instead of keeping
                them, see :func:`resolve_vae_checkpointing` ("auto": on GPUs with less than 40 GiB, else for 1024 px
                encodes).
            memory: a preset of :data:`~dreamflow.denoisers.memory.MEMORY_PRESETS` ("default", "low_vram": a 12 GB
                card) or a :class:`~dreamflow.denoisers.memory.MemoryConfig`: text encoders and VAE off the GPU
                (as ``cpu_offload``), VAE and UNet gradient checkpointing, and the views per update the stages run
                (each field's docstring says what it saves and costs). Explicit ``cpu_offload=True`` or
                ``vae_checkpointing`` other than "auto" win over the preset.
        """
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        memory = memory_config(memory)
        cpu_offload = bool(cpu_offload) or memory.cpu_offload
        path = resolve_model(name_or_path)
        # In ComfyUI: room for the weights (their size on disk) first, as its own loaders make room
        hosting.make_room(device, weights_bytes(path), why=f"loading {name_or_path}")
        # The VAE loads in float32 (it is small) so that an upcast VAE keeps its full-precision weights.
        comps = load_components(path, dtype=dtype, text_dtype=torch.float32 if cpu_offload else dtype,
                                vae_dtype=torch.float32)
        denoiser = cls(comps, name=name_or_path, device=device, dtype=dtype, cpu_offload=cpu_offload,
                       vae_slicing=vae_slicing, vae_tiling=vae_tiling, vae_dtype=vae_dtype,
                       vae_checkpointing=vae_checkpointing, memory=memory)
        if preset_name(memory) != "default":
            log.info("dreamflow: %s with memory preset '%s' (%s)", name_or_path, preset_name(memory), memory)
        return denoiser

    def unload(self) -> None:
        """Move every module to the CPU, drop the references and free cached GPU memory."""
        self.disable_fast_path()  # captured graphs point at the GPU weights
        for attr in ("unet", "vae", "text_encoder", "text_encoder_2"):
            m = getattr(self, attr, None)
            if m is not None:
                m.to("cpu")
            setattr(self, attr, None)
        self._prompt_cache.clear()
        hosting.free_memory()

    def enable_fast_path(self, config=None):
        """Replay the frozen UNet calls from CUDA graphs and fuse the scene LoRA's AdamW (CUDA only).

        Args:
            config: a :class:`~dreamflow.denoisers.fast.FastPathConfig` (default: all fast paths on).
        Returns:
            the :class:`~dreamflow.denoisers.fast.FastPath` (also ``self.fast_path``; stages use it).
        Raises:
            DreamFlowError: the denoiser is not on a CUDA device.
        """
        from .fast import FastPath

        self.disable_fast_path()
        self.fast_path = FastPath(self, config)
        return self.fast_path

    def disable_fast_path(self) -> None:
        """Back to the eager calls (drops the captured graphs and the compiled UNet blocks)."""
        if self.fast_path is not None:
            self.fast_path.close()
        self.fast_path = None

    def __repr__(self) -> str:
        return (f"Denoiser(kind={self.kind!r}, name={self.name!r}, prediction_type={self.prediction_type!r}, "
                f"device={self.device}, dtype={self.dtype}, native_resolution={self.native_resolution}, "
                f"memory={preset_name(self.memory)!r})")

    # ------------------------------------------------------------------ prompts
    def _encode_text(self, text: str) -> Tuple[Tensor, Optional[Tensor]]:
        """One prompt -> ([1, 77, D] hidden states, [1, P] pooled or None), cached by string."""
        if text in self._prompt_cache:
            return self._prompt_cache[text]
        if self.kind == "sd":
            tok, te = self.tokenizer, self.text_encoder
        else:
            tok, te = self.tokenizer_2, self.text_encoder_2
        ids = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self._text_device)
        with torch.no_grad():
            if self.kind == "sd":
                # SD 1.x/2.x condition on the last hidden state (SD 2's config already drops the final layer).
                hidden, pooled = te(ids)[0], None
            else:
                # SDXL: penultimate hidden state + projected pooled output (StableDiffusionXLImg2ImgPipeline.encode_prompt).
                out = te(ids, output_hidden_states=True)
                hidden, pooled = out.hidden_states[-2], out[0]
            if self.kind == "sdxl_refiner" and text == "" and self.force_zeros_for_empty_prompt:
                hidden, pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
        hidden = hidden.to(self.device, self.dtype)
        pooled = None if pooled is None else pooled.to(self.device, self.dtype)
        self._prompt_cache[text] = (hidden, pooled)
        return hidden, pooled

    def encode_prompt(self, prompts: Union[str, List[str]], negative: str = "",
                      original_size: Optional[Tuple[int, int]] = None, aesthetic_score: float = AESTHETIC_SCORE,
                      negative_aesthetic_score: float = NEGATIVE_AESTHETIC_SCORE) -> PromptEmbeds:
        """Encode B prompts (one per view) and the negative prompt; each distinct string is encoded once.

        Args:
            prompts: a prompt or a list of B prompts.
            negative: negative prompt for the unconditional branch ("" = plain CFG).
            original_size: refiner only, (h, w) micro-conditioning; default (native, native).
            aesthetic_score, negative_aesthetic_score: refiner only (diffusers defaults 6.0 / 2.5).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise DreamFlowError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
        rows = [self._encode_text(p) for p in prompts]
        neg = self._encode_text(negative)
        B = len(prompts)
        cond = torch.cat([r[0] for r in rows])
        uncond = neg[0].expand(B, -1, -1).clone()
        if self.kind == "sd":
            return PromptEmbeds(cond=cond, uncond=uncond)
        h, w = original_size or (self.native_resolution, self.native_resolution)
        tid = torch.tensor([[h, w, 0, 0, aesthetic_score]], device=self.device, dtype=self.dtype).expand(B, -1).clone()
        tid_u = torch.tensor([[h, w, 0, 0, negative_aesthetic_score]], device=self.device,
                             dtype=self.dtype).expand(B, -1).clone()
        return PromptEmbeds(cond=cond, uncond=uncond, pooled_cond=torch.cat([r[1] for r in rows]),
                            pooled_uncond=neg[1].expand(B, -1).clone(), time_ids_cond=tid, time_ids_uncond=tid_u)

    # ------------------------------------------------------------------ VAE
    @contextmanager
    def _vae_on_device(self) -> Iterator[None]:
        if not self.cpu_offload or getattr(self, "_vae_pinned", 0):
            yield
            return
        self.vae.to(self.device)
        try:
            yield
        finally:
            self.vae.to(self._vae_home)

    @contextmanager
    def vae_resident(self) -> Iterator[None]:
        """Keep the VAE on the device for the whole block (one stage update: encode *and* its backward).

        With ``cpu_offload`` the VAE otherwise goes back to the CPU right after ``encode_images``, and the
        backward pass through the encoder would then find its weights on the wrong device.
        """
        if not self.cpu_offload:
            yield
            return
        self._vae_pinned = getattr(self, "_vae_pinned", 0) + 1
        if self._vae_pinned == 1:
            self.vae.to(self.device)
        try:
            yield
        finally:
            self._vae_pinned -= 1
            if self._vae_pinned == 0:
                self.vae.to(self._vae_home)

    def _check_image_size(self, h: int, w: int, what: str) -> None:
        f = self.vae_scale_factor
        if h % f or w % f:
            raise DreamFlowError(f"{what} size {h}x{w} is not a multiple of the VAE factor {f}; render at a multiple of {f}")

    def encode_images(self, images: Tensor, sample: bool = True, generator: Optional[torch.Generator] = None) -> Tensor:
        """Images -> scaled latents ``z = (E(2x - 1) - shift) * scaling_factor``; differentiable w.r.t. ``images``.

        Args:
            images: [B, 3, H, W] in [0, 1], any float dtype/device; H, W multiples of ``vae_scale_factor``.
            sample: draw from the VAE posterior (threestudio ``posterior.sample()``) or take its mean.
            generator: for the posterior sample.

        Returns:
            [B, latent_channels, H / f, W / f] in ``images.dtype`` on ``self.device``.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise DreamFlowError(f"encode_images expects [B, 3, H, W] images, got shape {tuple(images.shape)}")
        self._check_image_size(images.shape[2], images.shape[3], "image")
        x = images.to(self.device, self.vae_dtype) * 2.0 - 1.0
        if self.vae_checkpointing == "large":
            self.vae.encoder.gradient_checkpointing = max(images.shape[2:]) >= VAE_CHECKPOINTING_MIN_PX
        with self._vae_on_device():
            dist = self.vae.encode(x).latent_dist
            z = dist.sample(generator) if sample else dist.mean
        return ((z - self.shift_factor) * self.scaling_factor).to(images.dtype)

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents [B, C, h, w] -> images [B, 3, h * f, w * f] in [0, 1] (``latents.dtype``); differentiable."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise DreamFlowError(f"decode_latents expects [B, {self.latent_channels}, h, w] latents, got {tuple(latents.shape)}")
        z = latents.to(self.device, self.vae_dtype) / self.scaling_factor + self.shift_factor
        with self._vae_on_device():
            x = self.vae.decode(z).sample
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0).to(latents.dtype)

    # ------------------------------------------------------------------ noise schedule
    def _t(self, t: Union[float, Tensor], batch: Optional[int] = None) -> Tensor:
        """``t`` as a float32 tensor on the device, [batch] when ``batch`` is given."""
        t = torch.as_tensor(t, dtype=torch.float32, device=self.device)
        if batch is not None:
            t = t.reshape(-1).expand(batch) if t.numel() == 1 else t.reshape(-1)
            if t.shape[0] != batch:
                raise DreamFlowError(f"t has {t.shape[0]} entries for a batch of {batch}; give one t or one per view")
        return t

    def alpha_bar(self, t: Union[float, Tensor]) -> Tensor:
        """alpha_bar(t) for continuous ``t`` in [0, 1]: linear interpolation of alphas_cumprod at ``t (T - 1)``.

        Returns a float32 tensor of ``t``'s shape. ``t = k / (T - 1)`` gives ``alphas_cumprod[k]`` exactly.
        """
        t = self._t(t)
        s = t.clamp(0.0, 1.0) * (self.num_train_timesteps - 1)
        lo = s.floor().long().clamp(max=self.num_train_timesteps - 1)
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        w = s - lo.to(s.dtype)
        ac = self.alphas_cumprod
        return ac[lo] * (1.0 - w) + ac[hi] * w

    def sigma(self, t: Union[float, Tensor]) -> Tensor:
        """EDM noise level sigma(t) = sqrt((1 - a) / a), float32, ``t``'s shape."""
        a = self.alpha_bar(t)
        return ((1.0 - a) / a).sqrt()

    def _coefs(self, t, like: Tensor) -> Tuple[Tensor, Tensor]:
        """(sqrt(a), sqrt(1 - a)) shaped to broadcast over ``like`` [B, ...] (float32)."""
        a = self.alpha_bar(self._t(t, like.shape[0]))
        shape = (-1,) + (1,) * (like.ndim - 1)
        return a.sqrt().reshape(shape), (1.0 - a).sqrt().reshape(shape)

    def add_noise(self, x0: Tensor, eps: Tensor, t) -> Tensor:
        """x_t = sqrt(a) x0 + sqrt(1 - a) eps (DDPM forward process), in ``x0.dtype``."""
        sa, sb = self._coefs(t, x0)
        return (sa * x0.float() + sb * eps.float()).to(x0.dtype)

    def x0_from_eps(self, x_t: Tensor, eps: Tensor, t) -> Tensor:
        """x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) (Tweedie's denoised estimate for an eps model)."""
        sa, sb = self._coefs(t, x_t)
        return ((x_t.float() - sb * eps.float()) / sa).to(x_t.dtype)

    def eps_from_x0(self, x_t: Tensor, x0: Tensor, t) -> Tensor:
        """eps = (x_t - sqrt(a) x0) / sqrt(1 - a)."""
        sa, sb = self._coefs(t, x_t)
        return ((x_t.float() - sa * x0.float()) / sb).to(x_t.dtype)

    def v_from_eps(self, x_t: Tensor, eps: Tensor, t) -> Tensor:
        """v = sqrt(a) eps - sqrt(1 - a) x0 = (eps - sqrt(1 - a) x_t) / sqrt(a)."""
        sa, sb = self._coefs(t, x_t)
        return ((eps.float() - sb * x_t.float()) / sa).to(x_t.dtype)

    def eps_from_v(self, x_t: Tensor, v: Tensor, t) -> Tensor:
        """eps = sqrt(a) v + sqrt(1 - a) x_t."""
        sa, sb = self._coefs(t, x_t)
        return (sa * v.float() + sb * x_t.float()).to(x_t.dtype)

    def x0_from_v(self, x_t: Tensor, v: Tensor, t) -> Tensor:
        """x0 = sqrt(a) x_t - sqrt(1 - a) v."""
        sa, sb = self._coefs(t, x_t)
        return (sa * x_t.float() - sb * v.float()).to(x_t.dtype)

    def eps_from_output(self, output: Tensor, x_t: Tensor, t) -> Tensor:
        """The UNet's raw output as an eps prediction (identity for epsilon models)."""
        if self.prediction_type == "epsilon":
            return output
        return self.eps_from_v(x_t, output, t)

    def target(self, x0: Tensor, eps: Tensor, t) -> Tensor:
        """The UNet's training target: eps (epsilon models) or v = sqrt(a) eps - sqrt(1 - a) x0 (v-prediction)."""
        if self.prediction_type == "epsilon":
            return eps
        sa, sb = self._coefs(t, x0)
        return (sa * eps.float() - sb * x0.float()).to(eps.dtype)

    # ------------------------------------------------------------------ UNet
    def _added_cond(self, embeds: PromptEmbeds, cond: bool) -> Optional[dict]:
        if self.kind != "sdxl_refiner":
            return None
        pooled = embeds.pooled_cond if cond else embeds.pooled_uncond
        tid = embeds.time_ids_cond if cond else embeds.time_ids_uncond
        if pooled is None or tid is None:
            raise DreamFlowError("the SDXL refiner needs pooled text embeddings and time ids; encode the prompt with "
                                 "the refiner's own Denoiser.encode_prompt")
        return {"text_embeds": pooled.to(self.device, self.dtype), "time_ids": tid.to(self.device, self.dtype)}

    def _run_unet(self, x_t: Tensor, t: Tensor, hidden: Tensor, added: Optional[dict]) -> Tensor:
        if hidden.shape[-1] != self.unet.config.cross_attention_dim:
            raise DreamFlowError(f"prompt embeddings have width {hidden.shape[-1]} but this UNet expects "
                                 f"{self.unet.config.cross_attention_dim}; encode prompts with the same denoiser")
        timestep = t * (self.num_train_timesteps - 1)
        out = self.unet(x_t.to(self.device, self.dtype), timestep, encoder_hidden_states=hidden.to(self.device, self.dtype),
                        added_cond_kwargs=added, return_dict=False)[0]
        return out.to(x_t.dtype)

    def _pretrained_unet(self, x_t: Tensor, t: Tensor, hidden: Tensor, added: Optional[dict]) -> Tensor:
        """``_run_unet`` for the frozen model's own predictions: replayed by the fast path when it is on and
        applies (it returns None otherwise, e.g. while a scene LoRA is enabled)."""
        if self.fast_path is not None:
            out = self.fast_path.unet(x_t, t, hidden, added)
            if out is not None:
                return out
        return self._run_unet(x_t, t, hidden, added)

    def _check_batch(self, x_t: Tensor, embeds: PromptEmbeds) -> None:
        if x_t.ndim != 4 or x_t.shape[1] != self.unet.config.in_channels:
            raise DreamFlowError(f"x_t must be [B, {self.unet.config.in_channels}, h, w] latents, got {tuple(x_t.shape)}")
        if len(embeds) != x_t.shape[0]:
            raise DreamFlowError(f"{len(embeds)} prompt embeddings for {x_t.shape[0]} latents; encode one prompt per view")

    def unet_output(self, x_t: Tensor, t, embeds: PromptEmbeds, cond: bool = True) -> Tensor:
        """Raw UNet output (eps or v, see ``prediction_type``) at timestep ``t (T - 1)`` (float), one call of B."""
        self._check_batch(x_t, embeds)
        t = self._t(t, x_t.shape[0])
        return self._run_unet(x_t, t, embeds.cond if cond else embeds.uncond, self._added_cond(embeds, cond))

    def predict_eps(self, x_t: Tensor, t, embeds: PromptEmbeds, cfg_scale: float) -> Tensor:
        """Classifier-free guided noise prediction eps_u + s (eps_c - eps_u) (Ho & Salimans 2022).

        One batched UNet call of 2B ([uncond, cond] order, as diffusers); ``s == 1`` runs only the conditional
        branch (one call of B). v-prediction outputs are converted to eps per branch first (the map is linear).
        """
        self._check_batch(x_t, embeds)
        t = self._t(t, x_t.shape[0])
        if cfg_scale == 1.0:
            return self.eps_from_output(self._pretrained_unet(x_t, t, embeds.cond, self._added_cond(embeds, True)), x_t, t)
        x2, t2 = torch.cat([x_t, x_t]), torch.cat([t, t])
        hidden = torch.cat([embeds.uncond, embeds.cond])
        added = None
        if self.kind == "sdxl_refiner":
            au, ac = self._added_cond(embeds, False), self._added_cond(embeds, True)
            added = {k: torch.cat([au[k], ac[k]]) for k in au}
        eps_u, eps_c = self.eps_from_output(self._pretrained_unet(x2, t2, hidden, added), x2, t2).chunk(2)
        return eps_u + cfg_scale * (eps_c - eps_u)


def require_kind(denoiser: Denoiser, kind: str, stage_name: str) -> Denoiser:
    """Raise unless ``denoiser.kind == kind`` (e.g. the refine stage needs the SDXL refiner); returns it."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    if denoiser is None or getattr(denoiser, "kind", None) != kind:
        got = "nothing" if denoiser is None else f"'{denoiser.name}', a {KINDS.get(denoiser.kind, denoiser.kind)} model"
        raise DreamFlowError(f"{stage_name} needs a {KINDS[kind]} denoiser but got {got}; connect a LoadDenoiser "
                             f"that loads a {KINDS[kind]} model")
    return denoiser
