"""Training of the toy prior (VAE, then UNet + text encoder) and of the benchmark classifier on toy-world images.

A tool beside the package, not part of it (the runtime only loads the trained prior, ``dreamflow/toy/prior.py``).
Read as numbered steps (driven by ``bench/toy_train.py``, which imports this file as ``toy_training``):

1. :func:`render_bank`: render every shape from ``views_per_shape`` random stage cameras with random lights, once
   (colour-independent part coverage / Lambertian terms, uint8 on the training device; ``world.render_geometry``).
2. :func:`compose_batch`: any batch of images from the bank: random colour, ambient and background per image
   (``world.compose``), and its caption "a red cube, side view" (view word of that camera).
3. :func:`train_vae`: AutoencoderKL on those images (L1 + L2 + 1e-6 KL); :func:`latent_scale` = 1 / std of latents.
4. :func:`train_unet`: UNet + CLIP text encoder with the DDPM epsilon loss (min-SNR-5 weights, Hang et al. 2023),
   10% empty captions for classifier-free guidance, bf16 autocast, AdamW with warm-up and cosine decay, EMA weights.
5. :func:`sample`: DDIM sampling with CFG from the EMA weights (the check grid of the training log).
6. :func:`train_classifier`: the benchmark's judge on banks rendered with other seeds (held-out views).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from dreamflow.render.cameras import VIEW_WORDS, sample_cameras, view_prompt
from dreamflow.render.shading import random_light
from dreamflow.toy.world import (COLOUR_NAMES, SHAPES, WorldConfig, caption, colour_tensor, compose, render_geometry,
                    sample_appearance, secondary_tensor)

Log = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# 1-2. Data
# --------------------------------------------------------------------------------------------
@dataclass
class GeometryBank:
    """Colour-independent renders of the world: N = shapes x views_per_shape images.

    Attributes:
        A, L: [N, H, W, 2] uint8 (value / 255): part coverage and Lambertian terms (``world.render_geometry``).
        O: [N, H, W, 1] uint8 opacity.
        shape_id: [N] int64 index into ``SHAPES``; view_id: [N] int64 index into ``VIEW_WORDS``.
    """

    A: Tensor
    L: Tensor
    O: Tensor
    shape_id: Tensor
    view_id: Tensor

    def __len__(self) -> int:
        return int(self.shape_id.shape[0])


def _u8(x: Tensor) -> Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def render_bank(views_per_shape: int, seed: int, cfg: Optional[WorldConfig] = None, device="cpu",
                batch: int = 128, backend: str = "auto", log: Optional[Log] = None) -> GeometryBank:
    """Render ``views_per_shape`` random views of every shape (seeded; cameras as the stages draw them)."""
    cfg = cfg or WorldConfig()
    A, L, O, sid, vid = [], [], [], [], []
    t0 = time.time()
    for s, shape in enumerate(SHAPES):
        # One generator per shape: a bank with fewer views is a prefix of a larger one (same seed).
        gen = torch.Generator().manual_seed(int(seed) * 1000 + s)
        for start in range(0, views_per_shape, batch):
            n = min(batch, views_per_shape - start)
            cams = sample_cameras(cfg.camera, n, cfg.resolution, generator=gen)
            lights = random_light(cams, gen)
            with torch.no_grad():
                geo = render_geometry(shape, cams.to(device), lights.to(device), backend=backend)
            A.append(_u8(geo["A"]))
            L.append(_u8(geo["L"]))
            O.append(_u8(geo["O"]))
            sid.append(torch.full((n,), s, dtype=torch.long))
            vid.append(torch.tensor([VIEW_WORDS.index(w) for w in cams.view_words(cfg.camera)], dtype=torch.long))
        if log:
            log(f"  rendered {shape}: {views_per_shape} views ({time.time() - t0:.1f} s so far)")
    dev = A[0].device
    return GeometryBank(torch.cat(A), torch.cat(L), torch.cat(O), torch.cat(sid).to(dev), torch.cat(vid).to(dev))


def views_within(budget_s: float, requested: int, batch: int, device="cpu", backend: str = "auto",
                 cfg: Optional[WorldConfig] = None) -> Tuple[int, float]:
    """Views per shape that :func:`render_bank` can render in about ``budget_s`` (timed on one batch of the
    torus, the largest mesh), capped at ``requested`` and rounded down to a multiple of ``batch``.

    Returns (views per shape, measured seconds per view).
    """
    cfg = cfg or WorldConfig()
    gen = torch.Generator().manual_seed(12345)
    for i in range(2):  # the first call pays for kernel set-up
        cams = sample_cameras(cfg.camera, batch, cfg.resolution, generator=gen)
        lights = random_light(cams, gen)
        if i == 1 and torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        with torch.no_grad():
            geo = render_geometry("torus", cams.to(device), lights.to(device), backend=backend)
        _ = float(geo["O"].sum())
    per_view = (time.time() - t0) / batch
    n = int(budget_s / (per_view * len(SHAPES)))
    return max(batch, min(requested, n // batch * batch)), per_view


def caption_table() -> List[str]:
    """All training captions in index order ``(shape * 6 + colour) * 4 + view``, then "" (unconditional) last."""
    caps = [view_prompt(caption(s, c), w) for s in SHAPES for c in COLOUR_NAMES for w in VIEW_WORDS]
    return caps + [""]


def caption_index(shape_id: Tensor, colour_id: Tensor, view_id: Tensor) -> Tensor:
    return (shape_id * len(COLOUR_NAMES) + colour_id) * len(VIEW_WORDS) + view_id


def compose_batch(bank: GeometryBank, n: int, gen: torch.Generator, cfg: Optional[WorldConfig] = None,
                  index: Optional[Tensor] = None, colour_id: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """A batch of ``n`` images from the bank with random colours / ambient / backgrounds (CPU draws, seeded).

    Returns:
        ``images`` [n, 3, H, W] float32 in [0, 1] on the bank's device, ``opacity`` [n, 1, H, W], and int64
        ``shape_id``, ``colour_id``, ``view_id``, ``caption_id`` [n] (into :func:`caption_table`).
    """
    cfg = cfg or WorldConfig()
    dev = bank.A.device
    if index is None:
        index = torch.randint(len(bank), (n,), generator=gen)
    if colour_id is None:
        colour_id = torch.randint(len(COLOUR_NAMES), (n,), generator=gen)
    look = sample_appearance(n, cfg, gen)
    idx = index.to(dev)
    shape_id = bank.shape_id[idx]
    colours = colour_tensor(COLOUR_NAMES).to(dev)[colour_id.to(dev)]
    second = secondary_tensor(SHAPES).to(dev)[shape_id]
    O = bank.O[idx].float() / 255
    img = compose(bank.A[idx].float() / 255, bank.L[idx].float() / 255, O, colours, second,
                  look["ambient"].to(dev), look["background"].to(dev))
    view_id = bank.view_id[idx]
    cid = colour_id.to(dev)
    return {"images": img.permute(0, 3, 1, 2).contiguous(), "opacity": O.permute(0, 3, 1, 2).contiguous(),
            "shape_id": shape_id, "colour_id": cid, "view_id": view_id,
            "caption_id": caption_index(shape_id, cid, view_id)}


# --------------------------------------------------------------------------------------------
# 3. VAE
# --------------------------------------------------------------------------------------------
def _cosine_lr(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))


def _autocast(device: torch.device, enabled: bool = True):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def train_vae(vae, batches: Callable[[int], Tensor], steps: int, lr: float = 1e-3, kl_weight: float = 1e-6,
              log: Optional[Log] = None, log_every: int = 100) -> List[dict]:
    """Train the AutoencoderKL; ``batches(step)`` gives images [B, 3, H, W] in [0, 1]. Returns log rows."""
    dev = next(vae.parameters()).device
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    rows, t0, acc = [], time.time(), []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * _cosine_lr(step, steps, warmup=min(100, steps // 10 + 1))
        x = batches(step) * 2 - 1
        with _autocast(dev):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
        rec = rec.float()
        l1 = (rec - x).abs().mean()
        mse = (rec - x).square().mean()
        kl = post.kl().float().mean()
        loss = l1 + mse + kl_weight * kl
        if not torch.isfinite(loss):
            raise RuntimeError(f"VAE training diverged at step {step} (loss {float(loss)})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        acc.append(torch.stack([l1.detach(), mse.detach(), kl.detach()]))
        if (step + 1) % log_every == 0 or step == steps - 1:
            m = torch.stack(acc).mean(0).tolist()
            acc = []
            rows.append({"step": step + 1, "l1": m[0], "mse": m[1], "kl": m[2], "time_s": time.time() - t0})
            if log:
                log(f"  vae {step + 1:6d}  l1 {m[0]:.4f}  mse {m[1]:.5f}  kl {m[2]:9.1f}  {time.time() - t0:6.1f} s")
    vae.eval()
    return rows


@torch.no_grad()
def latent_scale(vae, images: Tensor, batch: int = 256) -> float:
    """1 / std of posterior samples of ``images`` (SD's ``scaling_factor`` recipe: unit-variance latents)."""
    zs = []
    for i in range(0, images.shape[0], batch):
        zs.append(vae.encode(images[i:i + batch] * 2 - 1).latent_dist.sample().float())
    return float(1.0 / torch.cat(zs).std())


# --------------------------------------------------------------------------------------------
# 4. UNet + text encoder
# --------------------------------------------------------------------------------------------
@dataclass
class UNetTrainConfig:
    """UNet training settings (ours; measured on an H100: see bench/TOY_TRAINING.md)."""

    batch: int = 512
    """Images per step."""
    lr: float = 4e-4
    """AdamW peak learning rate (UNet and text encoder)."""
    warmup: int = 300
    """Linear warm-up steps."""
    max_steps: int = 100_000
    """Upper bound on steps (the time budget usually ends training first)."""
    budget_s: float = 300.0
    """Wall-clock budget of the step loop, seconds; the step count is fixed after timing the first steps."""
    uncond_prob: float = 0.1
    """Probability of the empty caption (classifier-free guidance training; Ho & Salimans 2022)."""
    min_snr_gamma: float = 5.0
    """Min-SNR loss weight min(SNR, gamma) / SNR for epsilon prediction (Hang et al. 2023)."""
    compile: bool = False
    """``torch.compile`` the UNet's forward (default mode; the step is launch-bound at this size). Falls back to
    eager, logged, if the first compiled step fails."""
    ema_decay: float = 0.999
    """EMA decay of the saved weights (with the usual (1 + n) / (10 + n) warm-up)."""
    log_every: int = 250


def train_unet(unet, text_encoder, vae, scale: float, token_ids: Tensor, batches: Callable[[int], Dict[str, Tensor]],
               acp: Tensor, cfg: UNetTrainConfig, log: Optional[Log] = None) -> Tuple[List[dict], Dict[str, Dict[str, Tensor]]]:
    """Train UNet + text encoder; returns (log rows, EMA state dicts {"unet": ..., "text_encoder": ...}).

    Args:
        token_ids: [K, 77] input ids of :func:`caption_table` (the last row the empty caption).
        batches: ``step -> compose_batch(...)`` output.
        acp: [T] alphas_cumprod of the scheduler.
    """
    dev = next(unet.parameters()).device
    acp = acp.to(dev)
    T = acp.shape[0]
    token_ids = token_ids.to(dev)
    uncond = token_ids.shape[0] - 1
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = [p.detach().clone().float() for p in params]
    unet.train()
    text_encoder.train()
    vae.eval()
    gen = torch.Generator(device=dev).manual_seed(1234)
    net = unet
    if cfg.compile:
        net = torch.compile(unet)
        if log:
            log("  unet: torch.compile (default mode)")
    rows, acc = [], []
    total = cfg.max_steps
    t0 = time.time()
    step = 0
    while step < total:
        if step == 10:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t10 = time.time()
        if step == 60:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            # Steps 10..60 (after cuDNN's autotuning) fix the step count of the time budget.
            per_step = (time.time() - t10) / 50
            total = max(100, min(cfg.max_steps, int((cfg.budget_s - (t10 - t0)) / per_step) + 10))
            if log:
                log(f"  unet: {per_step * 1000:.1f} ms/step (steps 10-60) -> {total} steps in {cfg.budget_s:.0f} s")
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _cosine_lr(step, total, cfg.warmup)
        b = batches(step)
        x = b["images"] * 2 - 1
        n = x.shape[0]
        with torch.no_grad(), _autocast(dev):
            z0 = vae.encode(x).latent_dist.sample(generator=gen).float() * scale
        cap = b["caption_id"].clone()
        drop = torch.rand(n, device=dev, generator=gen) < cfg.uncond_prob
        cap[drop] = uncond
        t = torch.randint(0, T, (n,), device=dev, generator=gen)
        eps = torch.randn(z0.shape, device=dev, generator=gen)
        a = acp[t].view(n, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        with _autocast(dev):
            # Encode each distinct caption once (<= 169 per step), then gather per image.
            uniq, inv = torch.unique(cap, return_inverse=True)
            hidden = text_encoder(token_ids[uniq])[0][inv]
            try:
                pred = net(zt, t, encoder_hidden_states=hidden).sample
            except Exception as e:  # a compile failure shows on the first call: go on eagerly
                if net is unet or step > 0:
                    raise
                if log:
                    log(f"  unet: compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); eager")
                net = unet
                pred = net(zt, t, encoder_hidden_states=hidden).sample
        snr = a.view(n) / (1 - a.view(n))
        w = torch.clamp(snr, max=cfg.min_snr_gamma) / snr
        per = (pred.float() - eps).square().mean(dim=(1, 2, 3))
        loss = (w * per).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach().float() for p in params], 1 - d)
        acc.append(torch.stack([loss.detach(), per.detach().mean(), gnorm.detach().float()]))
        step += 1
        if step % cfg.log_every == 0 or step == total:
            m = torch.stack(acc).mean(0).tolist()
            acc = []
            row = {"step": step, "loss_minsnr": m[0], "mse_eps": m[1], "grad_norm": m[2], "time_s": time.time() - t0,
                   "lr": opt.param_groups[0]["lr"]}
            rows.append(row)
            if not math.isfinite(m[0]):
                raise RuntimeError(f"UNet training diverged by step {step}")
            if log:
                log(f"  unet {step:6d}  loss {m[0]:.4f}  mse {m[1]:.4f}  |g| {m[2]:.3f}  {row['time_s']:6.1f} s")
    unet.eval()
    text_encoder.eval()
    # EMA weights out, in the modules' parameter order.
    nu = len(list(unet.parameters()))
    out = {"unet": {}, "text_encoder": {}}
    for (name, p), e in zip(unet.named_parameters(), ema[:nu]):
        out["unet"][name] = e
    for (name, p), e in zip(text_encoder.named_parameters(), ema[nu:]):
        out["text_encoder"][name] = e
    for mod, key in ((unet, "unet"), (text_encoder, "text_encoder")):
        for name, buf in mod.named_buffers():
            if name in mod.state_dict():
                out[key][name] = buf.detach().clone()
    return rows, out


# --------------------------------------------------------------------------------------------
# 5. Sampling (check images)
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def sample(unet, text_encoder, vae, scale: float, token_ids: Tensor, caption_ids: Tensor, scheduler_config: dict,
           steps: int = 30, cfg_scale: float = 4.0, seed: int = 0) -> Tensor:
    """DDIM samples (eta 0) with classifier-free guidance -> images [B, 3, H, W] in [0, 1]."""
    from diffusers import DDIMScheduler

    dev = next(unet.parameters()).device
    sched = DDIMScheduler.from_config(scheduler_config, clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(steps, device=dev)
    n = caption_ids.shape[0]
    size = unet.config.sample_size
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    z = torch.randn(n, unet.config.in_channels, size, size, device=dev, generator=gen)
    ids = token_ids.to(dev)
    with _autocast(dev):
        cond = text_encoder(ids[caption_ids.to(dev)])[0]
        unc = text_encoder(ids[-1:].expand(n, -1))[0]
        for t in sched.timesteps:
            out = unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([unc, cond])).sample.float()
            eu, ec = out.chunk(2)
            z = sched.step(eu + cfg_scale * (ec - eu), t, z).prev_sample
        x = vae.decode(z / scale).sample.float()
    return ((x + 1) / 2).clamp(0, 1)


# --------------------------------------------------------------------------------------------
# 6. Classifier
# --------------------------------------------------------------------------------------------
def train_classifier(model, batches: Callable[[int], Dict[str, Tensor]], steps: int, lr: float = 2e-3,
                     log: Optional[Log] = None, log_every: int = 200, seed: int = 0) -> List[dict]:
    """Train the :class:`~dreamflow.toy.classifier.ToyClassifier` on augmented world images."""
    from dreamflow.toy.classifier import augment, loss_fn

    dev = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(int(seed))
    model.train()
    rows, acc, t0 = [], [], time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * _cosine_lr(step, steps, warmup=min(100, steps // 10 + 1), floor=0.02)
        b = batches(step)
        x = augment(b["images"], b["opacity"], model.config, gen)
        with _autocast(dev):
            loss = loss_fn(model, x, b["shape_id"], b["colour_id"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc.append(loss.detach())
        if (step + 1) % log_every == 0 or step == steps - 1:
            m = float(torch.stack(acc).mean())
            acc = []
            rows.append({"step": step + 1, "loss": m, "time_s": time.time() - t0})
            if log:
                log(f"  classifier {step + 1:5d}  loss {m:.4f}  {time.time() - t0:6.1f} s")
    model.eval()
    return rows


def tokenize(tokenizer, captions: Sequence[str]) -> Tensor:
    """[K, 77] int64 CLIP input ids (padded to max length, as ``Denoiser.encode_prompt`` does)."""
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids
