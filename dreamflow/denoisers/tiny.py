"""Tiny, randomly initialised diffusers pipelines written to disk (tests, CI, and the project's toy prior).

Each builder writes a complete diffusers folder with the real constructors and ``save_pretrained`` (safetensors):
``model_index.json``, ``unet/``, ``vae/``, ``text_encoder(_2)/``, ``tokenizer(_2)/`` (a small CLIP BPE made by
:mod:`.tokenizer`) and ``scheduler/``. The folders load through exactly the path real models take
(:meth:`dreamflow.denoisers.Denoiser.load`). Shapes follow diffusers' own pipeline tests (block_out_channels
(32, 64), cross_attention_dim 32, CLIP hidden 32). A build takes well under a second after imports.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch

from .tokenizer import BOS, DEFAULT_WORDS, EOS, write_clip_tokenizer

# SD 1.x/2.x/SDXL noise schedule (scaled_linear betas 0.00085..0.012, 1000 steps): source = the released
# scheduler_config.json files.
_SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    trained_betas=None, steps_offset=1)


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def _write_model_index(path: str, class_name: str, components: Dict[str, Tuple[Optional[str], Optional[str]]],
                       **extra) -> None:
    index = {"_class_name": class_name, "_diffusers_version": _diffusers_version(), **extra}
    index.update({k: list(v) for k, v in components.items()})
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)


def _text_config(vocab: Dict[str, int], hidden_size: int, layers: int, pad_id: int, **kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                          num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=77,
                          projection_dim=hidden_size, hidden_act="gelu", bos_token_id=vocab[BOS],
                          eos_token_id=vocab[EOS], pad_token_id=pad_id, **kw)


def _tiny_vae(block_out_channels: Sequence[int], sample_size: int, scaling_factor: float, force_upcast: bool):
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(block_out_channels),
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         layers_per_block=1, norm_num_groups=min(32, block_out_channels[0]), sample_size=sample_size,
                         scaling_factor=scaling_factor, force_upcast=force_upcast)


def build_tiny_sd(path: str, prediction_type: str = "epsilon", sample_size: int = 8, seed: int = 0,
                  words: Iterable[str] = DEFAULT_WORDS, block_out_channels: Sequence[int] = (32, 64),
                  vae_block_out_channels: Sequence[int] = (32, 64), hidden_size: int = 32, text_layers: int = 2,
                  layers_per_block: int = 1) -> str:
    """Write a tiny ``StableDiffusionPipeline`` folder to ``path`` and return ``path``.

    Args:
        path: output folder (created; existing files are overwritten).
        prediction_type: "epsilon" (SD 1.x, 2.x-base) or "v_prediction" (SD 2.x 768).
        sample_size: UNet latent size; images are ``sample_size * 2 ** (len(vae_block_out_channels) - 1)`` px.
        seed: weight initialisation seed (the global RNG is left untouched).
        words: words that are single tokens of the tokenizer (others tokenize byte by byte).
        block_out_channels: UNet channels per level; level 0 is plain, the others have cross-attention.
        vae_block_out_channels: VAE channels per level (its downsampling factor is 2 ** (levels - 1)).
        hidden_size: CLIP hidden size = UNet cross_attention_dim.
        text_layers: CLIP transformer layers.
        layers_per_block: UNet resnets per level.
    """
    from diffusers import PNDMScheduler, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type {prediction_type!r}: use 'epsilon' or 'v_prediction'")
    os.makedirs(path, exist_ok=True)
    vocab = write_clip_tokenizer(os.path.join(path, "tokenizer"), words)
    n = len(block_out_channels)
    vae_factor = 2 ** (len(vae_block_out_channels) - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
            block_out_channels=tuple(block_out_channels), norm_num_groups=min(32, block_out_channels[0]),
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
            cross_attention_dim=hidden_size, attention_head_dim=8)
        vae = _tiny_vae(vae_block_out_channels, sample_size * vae_factor, 0.18215, False)
        text_encoder = CLIPTextModel(_text_config(vocab, hidden_size, text_layers, pad_id=vocab[EOS]))
    unet.save_pretrained(os.path.join(path, "unet"), safe_serialization=True)
    vae.save_pretrained(os.path.join(path, "vae"), safe_serialization=True)
    text_encoder.save_pretrained(os.path.join(path, "text_encoder"), safe_serialization=True)
    if prediction_type == "epsilon":
        sched = PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, prediction_type=prediction_type,
                              **_SD_SCHEDULE)
    else:
        sched = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, prediction_type=prediction_type,
                              **_SD_SCHEDULE)
    sched.save_pretrained(os.path.join(path, "scheduler"))
    _write_model_index(path, "StableDiffusionPipeline", {
        "feature_extractor": (None, None), "safety_checker": (None, None),
        "scheduler": ("diffusers", type(sched).__name__), "text_encoder": ("transformers", "CLIPTextModel"),
        "tokenizer": ("transformers", "CLIPTokenizer"), "unet": ("diffusers", "UNet2DConditionModel"),
        "vae": ("diffusers", "AutoencoderKL")}, requires_safety_checker=False)
    return path


def build_tiny_sdxl_refiner(path: str, seed: int = 0, words: Iterable[str] = DEFAULT_WORDS,
                            sample_size: int = 8) -> str:
    """Write a tiny ``StableDiffusionXLImg2ImgPipeline`` refiner folder (only ``text_encoder_2``) to ``path``.

    The UNet has SDXL's "text_time" added conditioning with 5 time ids (refiner: original size, crop, aesthetic
    score), so ``projection_class_embeddings_input_dim = pooled (32) + 5 * addition_time_embed_dim (8) = 72``.
    """
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    os.makedirs(path, exist_ok=True)
    # OpenCLIP tokenizers pad with id 0 = "!" (SDXL tokenizer_2/special_tokens_map.json).
    vocab = write_clip_tokenizer(os.path.join(path, "tokenizer_2"), words, pad_token="!")
    hidden = 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            norm_num_groups=32, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=hidden + 5 * 8, cross_attention_dim=hidden)
        vae = _tiny_vae((32, 64), sample_size * 2, 0.13025, True)
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(vocab, hidden, 2, pad_id=vocab["!"]))
    unet.save_pretrained(os.path.join(path, "unet"), safe_serialization=True)
    vae.save_pretrained(os.path.join(path, "vae"), safe_serialization=True)
    text_encoder_2.save_pretrained(os.path.join(path, "text_encoder_2"), safe_serialization=True)
    sched = EulerDiscreteScheduler(prediction_type="epsilon", timestep_spacing="leading", interpolation_type="linear",
                                   **_SD_SCHEDULE)
    sched.save_pretrained(os.path.join(path, "scheduler"))
    _write_model_index(path, "StableDiffusionXLImg2ImgPipeline", {
        "scheduler": ("diffusers", "EulerDiscreteScheduler"), "text_encoder": (None, None), "tokenizer": (None, None),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
        "tokenizer_2": ("transformers", "CLIPTokenizer"), "unet": ("diffusers", "UNet2DConditionModel"),
        "vae": ("diffusers", "AutoencoderKL"), "feature_extractor": (None, None), "image_encoder": (None, None)},
        force_zeros_for_empty_prompt=False, requires_aesthetics_score=True)
    return path


# --------------------------------------------------------------------------------------------
# Diffusers -> original (LDM / CompVis) key layout, inverse of diffusers' single-file converters.
# Used to write single-file test checkpoints; real users only ever go the other way.
# --------------------------------------------------------------------------------------------
_RESNET_TO_LDM = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                  ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))


def unet_to_ldm(sd: Dict[str, torch.Tensor], config: dict) -> Dict[str, torch.Tensor]:
    """Diffusers ``UNet2DConditionModel`` state dict -> LDM ``model.diffusion_model.*`` keys.

    Inverse of ``diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint`` for any number of levels and
    ``layers_per_block`` (LDM numbers input blocks ``level * (L + 1) + layer + 1``, output blocks
    ``level * (L + 1) + layer``).
    """
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    L = config["layers_per_block"]
    fixed = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if config.get("addition_embed_type") == "text_time":
        fixed.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    out = {}
    for k, v in sd.items():
        if k in fixed:
            out[fixed[k]] = v
            continue
        p = k.split(".")
        if p[0] == "down_blocks":
            b, kind = int(p[1]), p[2]
            if kind == "downsamplers":  # down_blocks.b.downsamplers.0.conv.X
                new = f"input_blocks.{(b + 1) * (L + 1)}.0.op.{p[-1]}"
            else:
                j = int(p[3])
                new = f"input_blocks.{b * (L + 1) + j + 1}.{0 if kind == 'resnets' else 1}." + ".".join(p[4:])
        elif p[0] == "up_blocks":
            b, kind = int(p[1]), p[2]
            if kind == "upsamplers":
                has_attn = any(x.startswith(f"up_blocks.{b}.attentions.") for x in sd)
                new = f"output_blocks.{b * (L + 1) + L}.{2 if has_attn else 1}.conv.{p[-1]}"
            else:
                j = int(p[3])
                new = f"output_blocks.{b * (L + 1) + j}.{0 if kind == 'resnets' else 1}." + ".".join(p[4:])
        elif p[0] == "mid_block":
            j = int(p[2])
            new = f"middle_block.{2 * j if p[1] == 'resnets' else 1}." + ".".join(p[3:])
        else:
            raise KeyError(f"no LDM name for UNet key {k}")
        if ".resnets." in k or p[0] == "mid_block" and p[1] == "resnets":
            for a, b_ in _RESNET_TO_LDM:
                new = new.replace(f".{a}.", f".{b_}.")
        out[new] = v
    return {"model.diffusion_model." + k: v for k, v in out.items()}


def vae_to_ldm(sd: Dict[str, torch.Tensor], config: dict) -> Dict[str, torch.Tensor]:
    """Diffusers ``AutoencoderKL`` state dict -> LDM ``first_stage_model.*`` keys (inverse of convert_ldm_vae_checkpoint)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n = len(config["up_block_types"])
    attn = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
    out = {}
    for k, v in sd.items():
        if k in fixed:
            out[fixed[k]] = v
            continue
        p = k.split(".")
        part = p[0]
        if p[1] == "down_blocks":
            i = p[2]
            if p[3] == "downsamplers":
                new = f"{part}.down.{i}.downsample.conv.{p[-1]}"
            else:
                new = f"{part}.down.{i}.block.{p[4]}." + ".".join(p[5:])
        elif p[1] == "up_blocks":
            i = n - 1 - int(p[2])
            if p[3] == "upsamplers":
                new = f"{part}.up.{i}.upsample.conv.{p[-1]}"
            else:
                new = f"{part}.up.{i}.block.{p[4]}." + ".".join(p[5:])
        elif p[1] == "mid_block" and p[2] == "resnets":
            new = f"{part}.mid.block_{int(p[3]) + 1}." + ".".join(p[4:])
        elif p[1] == "mid_block" and p[2] == "attentions":
            rest = ".".join(p[4:])
            for a, b in attn:
                if rest.startswith(a + "."):
                    rest = b + rest[len(a):]
            new = f"{part}.mid.attn_1.{rest}"
            if v.ndim == 2:  # LDM stores the attention projections as 1x1 convolutions
                v = v[:, :, None, None]
        else:
            raise KeyError(f"no LDM name for VAE key {k}")
        out[new.replace(".conv_shortcut.", ".nin_shortcut.")] = v
    return {"first_stage_model." + k: v for k, v in out.items()}


def save_as_single_file(folder: str, out_path: str) -> str:
    """Write a tiny SD 1.x-style diffusers folder (CLIPTextModel text encoder) as one LDM ``.safetensors`` file.

    The inverse of diffusers' ``from_single_file`` conversion, so that single-file loading can be tested on
    real files. Returns ``out_path``.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
    te = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"), local_files_only=True)
    ckpt = unet_to_ldm(unet.state_dict(), unet.config)
    ckpt.update(vae_to_ldm(vae.state_dict(), vae.config))
    te_sd = te.state_dict()
    # transformers >= 5.6 flattened CLIPTextModel (no "text_model." level); LDM files keep it.
    ckpt.update({"cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v
                 for k, v in te_sd.items()})
    save_file({k: v.contiguous() for k, v in ckpt.items()}, out_path)
    return out_path
