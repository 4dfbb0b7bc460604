"""The toy prior's architecture: a small Stable Diffusion (same diffusers layout) for 64 px images of the toy world.

Layout (``models/dreamflow-toy``): ``model_index.json`` (StableDiffusionPipeline), ``unet/`` (UNet2DConditionModel,
16 x 16 x 4 latents), ``vae/`` (AutoencoderKL, factor 4: 64 px <-> 16 px), ``text_encoder/`` (CLIPTextModel),
``tokenizer/`` (CLIP BPE in which every world word is one token, :mod:`dreamflow.denoisers.tokenizer`),
``scheduler/`` (PNDM config, SD's scaled-linear betas, epsilon prediction). The folder is written by
:func:`dreamflow.denoisers.tiny.build_tiny_sd` (the project's tiny-model builder) with the sizes below, then its
weights are replaced by trained ones (:func:`install_weights`), stored as float16 safetensors (the loader
upcasts on CPU). ``Denoiser.load("dreamflow-toy").native_resolution`` is 16 x 4 = 64 px.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

import torch

from ..errors import DreamFlowError
from .world import WORDS

#: Name of the shipped prior (a folder in the repository's ``models/``).
TOY_MODEL_NAME = "dreamflow-toy"


@dataclass
class ToyPriorConfig:
    """Sizes of the toy prior (ours: chosen so that the whole folder is <= 20 MB in float16)."""

    latent_size: int = 16
    """UNet sample size; images are latent_size x 4 = 64 px."""
    unet_channels: Tuple[int, ...] = (64, 128, 128)
    """UNet channels per level (16, 8, 4 px); levels 1 and 2 have cross-attention. 6.7 M parameters."""
    unet_layers_per_block: int = 1
    """ResNet blocks per UNet level (one: the demo's CPU updates stay fast; bench/RESULTS.md, "Figures moved from docstrings")."""
    vae_channels: Tuple[int, ...] = (32, 64, 64)
    """VAE channels per level; 3 levels = downsampling factor 4. 1.0 M parameters."""
    text_hidden: int = 128
    """CLIP hidden size = UNet cross_attention_dim."""
    text_layers: int = 3
    """CLIP transformer layers."""

    @property
    def resolution(self) -> int:
        return self.latent_size * 2 ** (len(self.vae_channels) - 1)


def build_toy_prior(path: str, config: Optional[ToyPriorConfig] = None, seed: int = 0) -> str:
    """Write a randomly initialised toy prior folder (full diffusers layout) to ``path``; returns ``path``."""
    from ..denoisers.tiny import build_tiny_sd

    cfg = config or ToyPriorConfig()
    build_tiny_sd(path, prediction_type="epsilon", sample_size=cfg.latent_size, seed=seed, words=WORDS,
                  block_out_channels=cfg.unet_channels, vae_block_out_channels=cfg.vae_channels,
                  hidden_size=cfg.text_hidden, text_layers=cfg.text_layers,
                  layers_per_block=cfg.unet_layers_per_block)
    with open(os.path.join(path, "toy_prior.json"), "w") as f:
        json.dump({"config": asdict(cfg)}, f, indent=2)
    return path


def load_trainable(path: str):
    """(unet, vae, text_encoder, tokenizer) of a toy prior folder, float32 on CPU, for training."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kw = dict(local_files_only=True, use_safetensors=True)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
    te = CLIPTextModel.from_pretrained(os.path.join(path, "text_encoder"), **kw)
    tok = CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer"), local_files_only=True)
    return unet.float(), vae.float(), te.float(), tok


def install_weights(path: str, weights: Dict[str, Dict[str, torch.Tensor]], scaling_factor: float,
                    card: Optional[dict] = None, dtype: torch.dtype = torch.float16) -> str:
    """Load trained state dicts into the folder's components and save them back as ``dtype`` safetensors.

    Args:
        path: a folder written by :func:`build_toy_prior` (same sizes as the weights).
        weights: ``{"unet": sd, "vae": sd, "text_encoder": sd}``; loaded strictly (a size mismatch is an error).
        scaling_factor: the VAE's latent scale (1 / std of training latents), written to ``vae/config.json``.
        card: training facts merged into ``toy_prior.json`` (steps, losses, times).
        dtype: storage dtype (float16 keeps the folder small; ``Denoiser.load`` upcasts on CPU).
    """
    unet, vae, te, _ = load_trainable(path)
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", te)):
        sd = weights[name]
        own = module.state_dict()
        # transformers >= 5.6 dropped CLIPTextModel's "text_model." level; accept either spelling.
        if name == "text_encoder" and set(sd) != set(own):
            flip = {(k[len("text_model."):] if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}
            if set(flip) == set(own):
                sd = flip
        try:
            module.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        except RuntimeError as e:
            raise DreamFlowError(f"trained {name} weights do not fit the toy prior in '{path}' "
                                 f"({str(e).splitlines()[0]}); build the folder with the same ToyPriorConfig") from None
    vae.register_to_config(scaling_factor=float(scaling_factor))
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", te)):
        module.to(dtype).save_pretrained(os.path.join(path, name), safe_serialization=True)
    meta_path = os.path.join(path, "toy_prior.json")
    meta = json.load(open(meta_path)) if os.path.isfile(meta_path) else {}
    meta.update(card or {})
    meta["scaling_factor"] = float(scaling_factor)
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=2)
    return path


def folder_size_mb(path: str) -> float:
    """Total size of the files under ``path``, MB (10^6 bytes)."""
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, n)) for n in files)
    return total / 1e6
