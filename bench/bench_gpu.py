"""GPU speed at real scale (issue 6): the real stage code driven by random-weight SD 2.1 base and SDXL refiner.

Speed does not depend on the weights, so networks of the exact released architectures (the config folders in
dreamflow/denoisers/configs/, built with ``from_config``, random init, float16) measure what the real models
would. One call, on one card, measures (eager baseline and fast path side by side):

1. the card's float16 matmul peak (``torch.matmul`` 8192^3, median of CUDA-event timings);
2. per denoiser, the pieces of one update: the CFG UNet call (FLOPs counted with ``FlopCounterMode``, eager
   vs CUDA graph, TFLOP/s and % of the measured peak), the scene-LoRA prediction, the LoRA training step
   (foreach vs fused AdamW) and the VAE encode + backward;
3. per stage (``run_nerf_stage`` / ``run_mesh_stage`` / ``run_refine_stage`` with their default configs except
   ``iterations`` and the switches named in the variant): ms per update over ``--iters`` timed updates after
   ``--warmup``, views per second, peak VRAM (``torch.cuda.max_memory_allocated``);
4. projected totals: the reference workload (10,000 view-updates at 256 px, 6,000 at 512, 2,000 at 1024) and
   the default schedule (iterations x views of the default configs);
5. options for smaller cards (text encoders / VAE offloaded to the CPU, gradient checkpointing) and their cost.

Variants: ``eager`` = defaults on the GPU with the pure-torch rasterizer, an uncompiled hash grid and no fast path;
``+grid`` = compiled hash grid; ``+nvdiffrast`` = ``backend="auto"``; ``fast`` = everything (what ComfyUI users
get by default): nvdiffrast, compiled grid, ``Denoiser.enable_fast_path()`` (CUDA graphs for the frozen UNet calls,
the scene-LoRA prediction and the LoRA step over compiled UNet / VAE-encoder blocks, fused AdamW for the LoRA);
``fast-sep`` / ``graphs`` / ``graphs-sep`` / ``run4``: see ``VARIANTS``. All variants use the stage defaults otherwise
(occupancy grid, float16 MLPs, VAE precision "auto", one scene-model forward shared by the APFO target and the LoRA
step).

    python bench/bench_gpu.py                    # GPU: writes $OUT/bench_gpu.json (or --out), prints a table
    python bench/bench_gpu.py --smoke            # CPU, tiny models: the same code end to end in seconds
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import faulthandler
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dreamflow.hosting import Callbacks  # noqa: E402

PROMPT = "a DSLR photo of a corgi standing up drinking boba"
#: Reference workload (issue 6; our reading of the paper's 50 / 40 / 20-minute split on an A100):
#: stage -> (view-updates, render px).
REFERENCE = {"nerf": (10_000, 256), "mesh": (6_000, 512), "refine": (2_000, 1024)}
TARGET_MINUTES, TARGET_VRAM_GB, TARGET_PEAK_FRACTION = 15.0, 20.0, 0.40


# --------------------------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 2) -> float:
    """Median ms of ``fn`` (CUDA events on the GPU, so back-to-back calls measure throughput)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gib(n_bytes: float) -> float:
    return n_bytes / 2 ** 30


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return gib(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else float("nan")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------
# Denoisers
# --------------------------------------------------------------------------------------------
def random_denoiser(config_name: str, device: torch.device, dtype: torch.dtype, seed: int = 0, **kw):
    """A Denoiser with the exact architecture of ``dreamflow/denoisers/configs/<config_name>`` (or of the config
    folder ``config_name``), random weights.

    Modules are built on ``device`` (fast init), the tokenizer is a small CLIP BPE (token ids do not change
    the cost). ``kw`` goes to ``Denoiser`` (cpu_offload, vae_slicing, vae_tiling).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from dreamflow.denoisers import Denoiser
    from dreamflow.denoisers.loading import CONFIGS_DIR, LoadedComponents, read_scheduler_config, detect_kind
    from dreamflow.denoisers.tokenizer import write_clip_tokenizer

    folder = config_name if os.path.isdir(config_name) else os.path.join(CONFIGS_DIR, config_name)

    def cfg(sub):
        with open(os.path.join(folder, sub, "config.json")) as f:
            return json.load(f)

    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    kind = detect_kind(index, folder)
    te_name, tok_name = ("text_encoder", "tokenizer") if kind == "sd" else ("text_encoder_2", "tokenizer_2")
    special = {}
    sp = os.path.join(folder, tok_name, "special_tokens_map.json")
    if os.path.isfile(sp):
        with open(sp) as f:
            special = {k: v for k, v in json.load(f).items() if isinstance(v, str)}
    tok_dir = tempfile.mkdtemp(prefix="dreamflow_tok_")
    write_clip_tokenizer(tok_dir, pad_token=special.get("pad_token", "<|endoftext|>"))
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
    te_cls = CLIPTextModel if kind == "sd" else CLIPTextModelWithProjection
    forks = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forks), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(cfg("unet"))
        vae = AutoencoderKL.from_config(cfg("vae"))
        text = te_cls(CLIPTextConfig.from_dict(cfg(te_name)))
    comps = LoadedComponents(kind=kind, path=folder, unet=unet, vae=vae, model_index=index,
                             scheduler_config=read_scheduler_config(folder))
    setattr(comps, te_name, text)
    setattr(comps, tok_name, tokenizer)
    return Denoiser(comps, name=f"random {os.path.basename(folder)}", device=device, dtype=dtype, **kw)


def tiny_denoiser(kind: str, folder: str, device: torch.device, **kw):
    """Smoke mode: the tiny test pipelines (dreamflow/denoisers/tiny.py), float32 on the CPU."""
    from dreamflow.denoisers import Denoiser
    from dreamflow.denoisers.tiny import build_tiny_sd, build_tiny_sdxl_refiner

    path = build_tiny_sd(folder) if kind == "sd" else build_tiny_sdxl_refiner(folder)
    return Denoiser.load(path, dtype="fp32", device=str(device), **kw)


def n_params(*modules) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


# --------------------------------------------------------------------------------------------
# 1. matmul peak
# --------------------------------------------------------------------------------------------
def matmul_peak(device: torch.device, smoke: bool) -> Dict[str, float]:
    n = 512 if smoke else 8192
    dtype = torch.float32 if smoke else torch.float16
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    ms = median_ms(lambda: torch.matmul(a, b), device, iters=5 if smoke else 30, warmup=3)
    return {"n": n, "dtype": str(dtype), "ms": ms, "tflops": 2 * n ** 3 / (ms * 1e-3) / 1e12}


# --------------------------------------------------------------------------------------------
# 2. pieces of one update
# --------------------------------------------------------------------------------------------
def unet_pieces(d, views: int, latent: int, image: int, peak_tflops: float, iters: int) -> Dict[str, object]:
    """CFG UNet call (eager / graph), scene eps (eager / graph), LoRA step (foreach / fused), VAE fwd+bwd."""
    from torch.utils.flop_counter import FlopCounterMode

    from dreamflow.denoisers.fast import FastPathConfig, use_fused_adamw
    from dreamflow.denoisers.graphs import GraphedSceneEps, GraphedSceneOutput
    from dreamflow.denoisers.scene import SceneDenoiser

    dev = d.device
    g = torch.Generator(device=dev).manual_seed(0)
    embeds = d.encode_prompt([PROMPT + ", side view"] * views, "")
    x = torch.randn(views, d.latent_channels, latent, latent, device=dev, generator=g)
    t = torch.full((views,), 0.6, device=dev)
    cam = torch.randn(views, 16, device=dev, generator=g)
    r: Dict[str, object] = {"views": views, "latent": latent, "cfg_batch": 2 * views}

    # FLOPs of the CFG call: counted on the eager predict_eps itself (one UNet call of 2B, [uncond, cond]; the
    # guidance arithmetic around it has no matmuls or convolutions, which are what FlopCounterMode counts)
    d.disable_fast_path()
    fc = FlopCounterMode(display=False)
    with fc, torch.no_grad():
        d.predict_eps(x, t, embeds, 7.5)
    flops = fc.get_total_flops()
    r["cfg_tflop"] = flops / 1e12

    with torch.no_grad():
        ref = d.predict_eps(x, t, embeds, 7.5)
        r["cfg_eager_ms"] = median_ms(lambda: d.predict_eps(x, t, embeds, 7.5), dev, iters)
    r["cfg_eager_tflops"] = flops / (r["cfg_eager_ms"] * 1e-3) / 1e12
    if dev.type == "cuda":
        d.enable_fast_path(FastPathConfig())
        with torch.no_grad():
            fast = d.predict_eps(x, t, embeds, 7.5)
            r["cfg_graph_ms"] = median_ms(lambda: d.predict_eps(x, t, embeds, 7.5), dev, iters)
        r["cfg_graph_tflops"] = flops / (r["cfg_graph_ms"] * 1e-3) / 1e12
        r["cfg_graph_rel_err"] = rel_err(fast, ref)
        r["cfg_graph_stats"] = d.fast_path.stats()
        d.disable_fast_path()
    best = min(v for k, v in r.items() if k in ("cfg_eager_ms", "cfg_graph_ms"))
    r["cfg_best_fraction_of_peak"] = flops / (best * 1e-3) / 1e12 / peak_tflops

    # scene model: eps (no grad) and one LoRA training step
    scene = SceneDenoiser(d, seed=1)
    try:
        with torch.no_grad():
            ref = scene.eps(x, t, embeds, cam)
            r["scene_eps_eager_ms"] = median_ms(lambda: scene.eps(x, t, embeds, cam), dev, iters)
        gen = torch.Generator(device=dev).manual_seed(1)
        r["lora_step_foreach_ms"] = median_ms(lambda: scene.train_step(x, embeds, cam, t=t, generator=gen), dev,
                                              max(3, iters // 2))
        if dev.type == "cuda":
            fp = d.enable_fast_path(FastPathConfig())
            graphed = GraphedSceneEps(scene, fp)
            with torch.no_grad():
                ref = scene.eps(x, t, embeds, cam)  # weights moved during the LoRA steps
                out = graphed(x, t, embeds, cam)
                r["scene_eps_graph_ms"] = median_ms(lambda: graphed(x, t, embeds, cam), dev, iters)
            r["scene_eps_graph_rel_err"] = rel_err(out, ref)
            scene.optimizer = torch.optim.AdamW(scene.parameters_to_train(), lr=scene.config.lr,
                                                betas=scene.config.betas, eps=scene.config.eps)
            r["fused_adamw"] = use_fused_adamw(scene)
            r["lora_step_fused_ms"] = median_ms(lambda: scene.train_step(x, embeds, cam, t=t, generator=gen), dev,
                                                max(3, iters // 2))
            scene.graphed_output = GraphedSceneOutput(scene, fp)
            r["lora_step_graph_fused_ms"] = median_ms(lambda: scene.train_step(x, embeds, cam, t=t, generator=gen),
                                                      dev, max(3, iters // 2))
            r["lora_step_graph_replays"] = scene.graphed_output.graphs.replays
            d.disable_fast_path()
    finally:
        scene.remove()

    # VAE encode + backward at the stage's denoise size (the loop differentiates through it)
    img = torch.rand(views, 3, image, image, device=dev, generator=g, requires_grad=True)
    vg = torch.Generator(device=dev).manual_seed(3)

    def vae_step():
        z = d.encode_images(img, generator=vg)
        z.float().square().mean().backward()

    peak_reset(dev)
    r["vae_fwd_bwd_ms"] = median_ms(vae_step, dev, max(3, iters // 2), warmup=1)
    r["vae_fwd_bwd_peak_gib"] = peak_gib(dev)
    r["vae_dtype"] = str(d.vae_dtype)
    if dev.type == "cuda":  # with the fast path's compiled VAE encoder blocks
        d.enable_fast_path(FastPathConfig())
        peak_reset(dev)
        r["vae_fwd_bwd_fast_ms"] = median_ms(vae_step, dev, max(3, iters // 2), warmup=2)
        r["vae_fwd_bwd_fast_peak_gib"] = peak_gib(dev)
        d.disable_fast_path()
    return r


# --------------------------------------------------------------------------------------------
# 3. stages
# --------------------------------------------------------------------------------------------
def stage_configs(stage: str, variant: Dict[str, object], smoke: bool, iterations: int):
    """The stage's default config with ``iterations`` and the variant's switches (smoke: tiny sizes)."""
    from dreamflow.render.volume import VolumeRenderConfig
    from dreamflow.scene.hashgrid import HashGridConfig
    from dreamflow.scene.nerf import NeRFFieldConfig
    from dreamflow.stages import MeshStageConfig, NeRFStageConfig, RefineConfig

    backend = "auto" if variant.get("nvdiffrast") else "torch"
    if stage == "nerf":
        grid = HashGridConfig(compile=bool(variant.get("compile")))
        kw = dict(iterations=iterations, nerf=NeRFFieldConfig(grid=grid))
        if smoke:
            kw.update(views_per_update=2, resolution=24, denoise_resolution=16,
                      nerf=NeRFFieldConfig(grid=HashGridConfig(n_levels=4, log2_hashmap_size=10, base_resolution=8,
                                                               compile=bool(variant.get("compile")))),
                      render=VolumeRenderConfig(n_samples=12, n_importance=4))
        cfg = NeRFStageConfig(**kw)
    else:
        cls = MeshStageConfig if stage == "mesh" else RefineConfig
        kw = dict(iterations=iterations, backend=backend)
        if smoke:
            kw.update(views_per_update=2, resolution=24, denoise_resolution=16)
        cfg = cls(**kw)
    if "shared_lora" in variant:  # GuidanceConfig.lora_shares_noise (default True) set explicitly
        cfg.guidance.lora_shares_noise = bool(variant["shared_lora"])
    return cfg


def default_schedule(stage: str):
    from dreamflow.stages import MeshStageConfig, NeRFStageConfig, RefineConfig

    c = {"nerf": NeRFStageConfig, "mesh": MeshStageConfig, "refine": RefineConfig}[stage]()
    return c.iterations, c.views_per_update, c.resolution


def sphere_state(device: torch.device, smoke: bool, compile_grid: bool):
    """A MeshState like ExtractMesh's output: a UV sphere of ~50,000 faces (ExtractConfig.face_budget) with a
    fresh NeRF colour field (threestudio grid) and background."""
    from dreamflow.scene.hashgrid import HashGridConfig
    from dreamflow.scene.mesh import uv_sphere
    from dreamflow.scene.nerf import Background, BackgroundConfig, NeRFField, NeRFFieldConfig
    from dreamflow.seeding import seeded
    from dreamflow.state import MeshState

    v, f = uv_sphere(8, 16) if smoke else uv_sphere(126, 200)
    grid = (HashGridConfig(n_levels=4, log2_hashmap_size=10, base_resolution=8, compile=compile_grid) if smoke
            else HashGridConfig(compile=compile_grid))
    with seeded(0):
        field = NeRFField(NeRFFieldConfig(grid=grid))
        bg = Background(BackgroundConfig())
    return MeshState(field=field, background=bg, prompt=PROMPT, vertices=v.float(), faces=f.long()).to(device)


def gpu_profile_summary(prof, updates: int, top: int = 12) -> Dict[str, object]:
    """From a CUDA-activity profile of ``updates`` updates: GPU-busy ms per update (union of kernel / copy
    intervals), the window's span, and the kernels with the most time (name, ms per update, calls per update)."""
    from torch.autograd import DeviceType

    spans, by_name = [], {}
    for e in prof.profiler.kineto_results.events():
        if e.device_type() != DeviceType.CUDA:
            continue
        a, b = e.start_ns(), e.start_ns() + e.duration_ns()
        spans.append((a, b))
        k = e.name()
        t, n = by_name.get(k, (0, 0))
        by_name[k] = (t + e.duration_ns(), n + 1)
    spans.sort()
    busy, end = 0, None
    for a, b in spans:
        if end is None or a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    span = (spans[-1][1] - spans[0][0]) if spans else 0
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {"gpu_busy_ms_per_update": busy / 1e6 / updates, "gpu_span_ms_per_update": span / 1e6 / updates,
            "busy_fraction": busy / span if span else float("nan"),
            "top_kernels": [(k[:90], t / 1e6 / updates, n / updates) for k, (t, n) in rows]}


def print_profile(stage: str, out: Dict[str, object]) -> None:
    """One stage's profile (:func:`gpu_profile_summary`) as a few lines."""
    pr = out.get("profile", {})
    print(f"  profile {stage}: wall {out['ms_per_update']:.1f} ms/update, GPU busy "
          f"{pr.get('gpu_busy_ms_per_update', float('nan')):.1f} ms "
          f"({pr.get('busy_fraction', float('nan')):.0%} of its span)", flush=True)
    for k, ms, n in pr.get("top_kernels", []):
        print(f"    {ms:7.2f} ms {n:6.1f}x  {k}", flush=True)


#: --stall-s: after a stage's first update (the cold compile), an update that takes longer than this dumps every
#: thread's Python stack to stderr and ends the process (a GPU hang then costs minutes of device time, not the
#: whole call; what finished is already in bench_gpu.json). 0 = off.
STALL_S = 0.0


def run_stage(stage: str, d, variant: Dict[str, object], device: torch.device, smoke: bool, warmup: int,
              iters: int, acc: Optional[Dict[str, float]] = None, profile: bool = False) -> Dict[str, object]:
    """Run the real stage for warmup + iters updates; time the last ``iters`` (host clock after a sync).

    With ``acc`` (a dict), the pieces of the timed updates are attributed too (:func:`breakdown`); with
    ``profile``, the timed updates run under a CUDA-activity profiler (:func:`gpu_profile_summary`)."""
    total = warmup + iters
    cfg = stage_configs(stage, variant, smoke, total)
    marks: Dict[int, float] = {}
    prof = None
    if profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity

        prof = torch.profiler.profile(activities=[ProfilerActivity.CUDA])

    def progress(step, _total, _preview):
        if STALL_S > 0:  # re-armed after every update, cancelled when the stage returns
            faulthandler.dump_traceback_later(STALL_S, exit=True)
        if step in (1, warmup, total):
            sync(device)
            marks[step] = time.perf_counter()
            if step == 1:  # a cold compile can take minutes: say where the run is
                print(f"  ({stage}: first update done after {marks[1] - t0:.1f} s)", flush=True)
        if step == warmup and acc is not None:
            acc.clear()
        if prof is not None and step == warmup:
            prof.__enter__()
        if prof is not None and step == total:
            prof.__exit__(None, None, None)

    cb = Callbacks(progress=progress, should_stop=lambda: False, preview_every=0)
    if variant.get("fast"):
        from dreamflow.denoisers.fast import FastPathConfig

        fp_cfg = FastPathConfig(compile="off") if variant.get("graphs_only") else FastPathConfig()
        if variant.get("sdpa_fp16_vae") and d.vae_dtype == torch.float16:  # "run4": run 4's SD 2.1 VAE attention
            fp_cfg.vae_matmul_attention = False
        d.enable_fast_path(fp_cfg)
    else:
        d.disable_fast_path()
    mesh = sphere_state(device, smoke, bool(variant.get("compile"))) if stage != "nerf" else None
    free(device)
    peak_reset(device)
    sync(device)
    t0 = time.perf_counter()
    try:
        with (breakdown(d, device, acc) if acc is not None else contextlib.nullcontext()):
            state = call_stage(stage, d, mesh, cfg, cb)
    finally:
        faulthandler.cancel_dump_traceback_later()
    ms = (marks[total] - marks[warmup]) * 1e3 / iters
    out = {"ms_per_update": ms, "views_per_update": cfg.views_per_update, "resolution": cfg.resolution,
           "denoise_resolution": cfg.denoise_resolution, "views_per_s": cfg.views_per_update / (ms * 1e-3),
           "first_update_s": marks[1] - t0, "warmup_s": marks[warmup] - t0, "peak_vram_gib": peak_gib(device),
           "finite_losses": all(math.isfinite(r["loss"]) for r in state.guidance_log),
           "timed_updates": iters}
    if acc is not None:
        ms_of = {k: v * 1e3 / iters for k, v in acc.items()}
        ms_of["scene eps + rest of guidance"] = ms_of.get("guidance", 0.0) - sum(
            ms_of.get(k, 0.0) for k in ("cfg unet", "lora fwd", "lora step"))
        ms_of["backward + optimiser + rest"] = ms - sum(ms_of.get(k, 0.0) for k in ("render", "vae encode", "guidance"))
        out["breakdown_ms"] = ms_of
    if prof is not None:
        out["profile"] = gpu_profile_summary(prof, iters)
    if d.fast_path is not None:
        out["fast_path_stats"] = d.fast_path.stats()
    d.disable_fast_path()
    del state, mesh
    free(device)
    return out


def call_stage(stage: str, d, mesh, cfg, callbacks: Callbacks):
    """``run_nerf_stage`` / ``run_mesh_stage`` / ``run_refine_stage`` on the benchmark prompt (``mesh``: the start of
    the mesh stages, None for the NeRF stage)."""
    from dreamflow.stages import run_mesh_stage, run_nerf_stage, run_refine_stage

    if stage == "nerf":
        return run_nerf_stage(d, PROMPT, "", cfg, callbacks=callbacks)
    if stage == "mesh":
        return run_mesh_stage(d, mesh, PROMPT, "", cfg, callbacks=callbacks)
    return run_refine_stage(d, mesh, PROMPT, "", cfg, callbacks=callbacks)


@contextlib.contextmanager
def breakdown(d, device: torch.device, acc: Dict[str, float]):
    """Attribute update time to its pieces: wraps the renderer, the VAE encode, the guidance call, the CFG
    prediction and the LoRA step with synchronised host timers (the syncs perturb: attribution only)."""
    def wrap(name, fn):
        def timed(*a, **k):
            sync(device)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync(device)
                acc[name] = acc.get(name, 0.0) + time.perf_counter() - t0
        return timed

    with patched_pieces(d, wrap):
        yield acc


@contextlib.contextmanager
def patched_pieces(d, wrap: Callable[[str, Callable], Callable]):
    """The pieces of a stage update replaced by ``wrap(piece, fn)`` for the block, then restored: "render" (volume
    and mesh renderers), "vae encode", "guidance" (the APFO call, which holds the next three), "cfg unet", "lora fwd"
    (SceneDenoiser.begin_step), "lora step" (its backward + optimiser step)."""
    import dreamflow.render.mesh_render as mesh_render
    import dreamflow.stages.nerf_stage as nerf_stage
    from dreamflow.denoisers.scene import SceneDenoiser
    from dreamflow.guidance.apfo import APFOGuidance

    patches = [(nerf_stage, "render_volume", "render"), (mesh_render, "render_mesh", "render"),
               (SceneDenoiser, "begin_step", "lora fwd"), (SceneDenoiser, "_finish", "lora step"),
               (APFOGuidance, "__call__", "guidance"),
               (d, "encode_images", "vae encode"), (d, "predict_eps", "cfg unet")]
    # (object, attribute, value to restore; None = delete the instance attribute again)
    saved = [(obj, attr, None if obj is d else obj.__dict__[attr]) for obj, attr, _ in patches]
    for obj, attr, name in patches:
        setattr(obj, attr, wrap(name, getattr(obj, attr)))
    try:
        yield
    finally:
        for obj, attr, old in saved:
            if old is None:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)


def projections(stage: str, ms: float, views: int) -> Dict[str, float]:
    """Seconds for the reference workload and for the default schedule at ``ms`` per update of ``views``."""
    ref_view_updates, _ = REFERENCE[stage]
    it, _, _ = default_schedule(stage)
    return {"reference_s": ref_view_updates / views * ms * 1e-3, "default_s": it * ms * 1e-3}


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
# "fast-sep": fast with GuidanceConfig(lora_shares_noise=False), i.e. the LoRA step's own noise and scene-model forward
# (the default shares one forward between the target and the LoRA step; A/B of that option); "graphs" / "graphs-sep":
# the same pair without torch.compile anywhere (no cold compile: a quick A/B on a fresh card); "run4": the code path of
# run 4 (H100, 2026-11-25), i.e. "fast-sep" with the float16 SD 2.1 VAE's attention through SDPA again (the refiner's
# VAE had matmul attention then already, so stage 3's run-4 path is "fast-sep"): measured beside the others it gives
# the card-to-card ratio against run 4's H100 figures. Run 6 (bench/RESULTS.md) called today's "fast" "fast-shared"
# and today's "fast-sep" "fast" (the default was lora_shares_noise=False then).
_GRAPHS = {"fast": True, "graphs_only": True}
_SEP = {"shared_lora": False}
_RUN4 = {"nvdiffrast": True, "compile": True, "fast": True, "sdpa_fp16_vae": True, **_SEP}
VARIANTS = {
    "nerf": [("eager", {}), ("fast", {"compile": True, "fast": True}), ("+grid", {"compile": True}),
             ("fast-sep", {"compile": True, "fast": True, **_SEP}),
             ("graphs", _GRAPHS), ("graphs-sep", {**_GRAPHS, **_SEP}),
             ("run4", {k: v for k, v in _RUN4.items() if k != "nvdiffrast"})],
    "mesh": [("eager", {}), ("fast", {"nvdiffrast": True, "compile": True, "fast": True}),
             ("+nvdiffrast", {"nvdiffrast": True}),
             ("fast-sep", {"nvdiffrast": True, "compile": True, "fast": True, **_SEP}),
             ("graphs", {**_GRAPHS, "nvdiffrast": True}), ("graphs-sep", {**_GRAPHS, "nvdiffrast": True, **_SEP}),
             ("run4", _RUN4)],
    "refine": [("eager", {}), ("fast", {"nvdiffrast": True, "compile": True, "fast": True}),
               ("+nvdiffrast", {"nvdiffrast": True}),
               ("fast-sep", {"nvdiffrast": True, "compile": True, "fast": True, **_SEP}),
               ("graphs", {**_GRAPHS, "nvdiffrast": True}), ("graphs-sep", {**_GRAPHS, "nvdiffrast": True, **_SEP})],
}


VARIANTS_BY_STAGE = {stage: dict(runs) for stage, runs in VARIANTS.items()}


def card_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        return torch.cuda.get_device_name(device)


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU + tiny models: check the script end to end")
    ap.add_argument("--out", default=os.environ.get("OUT") or "out", help="folder for bench_gpu.json")
    ap.add_argument("--stages", nargs="+", default=["nerf", "mesh", "refine"], choices=["nerf", "mesh", "refine"])
    ap.add_argument("--variants", nargs="+", default=None,
                    help="subset of: eager fast fast-sep graphs graphs-sep run4 +grid +nvdiffrast")
    ap.add_argument("--warmup", type=int, default=None, help="untimed updates first (default 3; smoke 1)")
    ap.add_argument("--iters", type=int, default=None, help="timed updates (default 10; smoke 2)")
    ap.add_argument("--no-pieces", action="store_true", help="skip the per-piece UNet / LoRA / VAE timings")
    ap.add_argument("--options", action="store_true",
                    help="also measure the refiner without VAE checkpointing, with a float32 VAE, and with cpu_offload")
    ap.add_argument("--breakdown", action="store_true", help="also attribute update time to its pieces (synced)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip what is left after this many seconds")
    ap.add_argument("--profile", action="store_true",
                    help="also run each fast stage once more under a CUDA profiler (GPU-busy fraction, top kernels)")
    ap.add_argument("--stall-s", type=float, default=180.0,
                    help="after a stage's first update, stop the process with every thread's stack when one update "
                         "takes longer than this (a GPU hang); 0 = off")
    args = ap.parse_args(argv)
    global STALL_S
    STALL_S = 0.0 if args.smoke else args.stall_s

    smoke = args.smoke
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)
    iters = args.iters if args.iters is not None else (2 if smoke else 10)
    t_start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_gpu.json")
    res: Dict[str, object] = {
        "card": card_name(device), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), "bench/bench_gpu.py"] + (argv or sys.argv[1:])),
        "torch": torch.__version__, "cuda": torch.version.cuda, "smoke": smoke, "warmup": warmup, "iters": iters,
        "stages": {}, "pieces": {}, "options": {}, "breakdown": {}, "errors": [], "skipped": []}

    def save():
        with open(path, "w") as f:
            json.dump(res, f, indent=1, default=str)

    def guarded(what: str, fn: Callable[[], object]):
        if time.perf_counter() - t_start > args.budget_s:
            res["skipped"].append(what)
            print(f"[skip] {what}: over --budget-s", flush=True)
            return None
        t0 = time.perf_counter()
        try:
            out = fn()
            print(f"[done] {what} in {time.perf_counter() - t0:.1f} s: {json.dumps(out, default=str)[:400]}", flush=True)
            return out
        except Exception as e:
            res["errors"].append(f"{what}: {type(e).__name__}: {str(e)[:300]}")
            print(f"[fail] {what}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
            free(device)
            return None
        finally:
            save()

    try:
        import diffusers

        res["diffusers"] = diffusers.__version__
        from dreamflow import backends

        res["raster_backend_auto"] = backends.pick("raster", "auto")
        res["hashgrid_backend_auto"] = backends.pick("hashgrid", "auto")
    except Exception as e:
        res["errors"].append(f"backends: {e}")
    print(f"card: {res['card']}  torch {torch.__version__}  raster auto: {res.get('raster_backend_auto')}", flush=True)
    peak = guarded("matmul peak", lambda: matmul_peak(device, smoke)) or {"tflops": float("nan")}
    res["matmul_peak"] = peak
    peak_tflops = peak["tflops"]
    tmp = tempfile.mkdtemp(prefix="dreamflow_bench_")

    def load(kind, **kw):
        if smoke:
            return tiny_denoiser(kind, os.path.join(tmp, f"{kind}-{len(kw)}"), device, **kw)
        return random_denoiser("sd21-base" if kind == "sd" else "sdxl-refiner", device, dtype, **kw)

    # Phases keep the most important numbers first (a budget stop loses only extras) and one denoiser on the
    # card at a time (peak VRAM per stage is then what that stage needs).
    plan = [("sd", True, [("nerf", "graphs"), ("mesh", "graphs"), ("nerf", "graphs-sep"), ("mesh", "graphs-sep"),
                          ("nerf", "eager"), ("nerf", "fast"), ("nerf", "fast-sep"), ("nerf", "run4"),
                          ("mesh", "eager"), ("mesh", "fast"), ("mesh", "fast-sep"), ("mesh", "run4"),
                          ("nerf", "pf:fast"), ("mesh", "pf:fast"), ("nerf", "pf:fast-sep"), ("mesh", "pf:fast-sep"),
                          ("nerf", "bd:fast"), ("mesh", "bd:fast"), ("mesh", "bd:eager")]),
            ("sdxl_refiner", True, [("refine", "graphs"), ("refine", "graphs-sep"),
                                    ("refine", "eager"), ("refine", "fast"), ("refine", "fast-sep"),
                                    ("refine", "pf:fast"), ("refine", "pf:fast-sep"),
                                    ("refine", "bd:fast"),
                                    ("refine", "bd:eager"), ("refine", "+nvdiffrast"), ("refine", "options")]),
            ("sd", False, [("nerf", "+grid"), ("mesh", "+nvdiffrast")])]
    for kind, pieces, tasks in plan:
        tasks = [(s, n) for s, n in tasks if s in args.stages and (n != "options" or args.options)
                 and (not n.startswith("bd:") or args.breakdown) and (not n.startswith("pf:") or args.profile)
                 and (not args.variants or n.split(":")[-1] in args.variants or n == "options")]
        if smoke:  # CUDA-only switches otherwise
            tasks = [(s, n) for s, n in tasks if n.split(":")[-1] in ("eager", "options")]
        if not tasks:
            continue
        free(device)
        d = guarded(f"build {kind}", lambda: load(kind))
        if d is None:
            continue
        info = res["pieces"].setdefault(kind, {})
        info["params_m"] = {"unet": n_params(d.unet) / 1e6, "vae": n_params(d.vae) / 1e6,
                            "text": n_params(d.text_encoder, d.text_encoder_2) / 1e6}
        info["weights_gib"] = gib(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None
        if pieces and not args.no_pieces:
            _, views, _ = default_schedule(tasks[0][0])
            image = 16 if smoke else (512 if kind == "sd" else 1024)
            latent = image // d.vae_scale_factor
            out = guarded(f"pieces {kind}", lambda: unet_pieces(d, views, latent, image, peak_tflops, 3 if smoke else 10))
            if out:
                info.update(out)
        for stage, name in tasks:
            if name == "options":
                options_refiner(d, res, guarded, device, smoke, warmup, iters, load)
                continue
            mode, _, vname = name.rpartition(":")
            if mode:  # "bd": synced per-piece timers, "pf": CUDA profile; 3 updates after 1
                key = {"bd": "breakdown", "pf": "profile"}[mode]
                variant = VARIANTS_BY_STAGE[stage][vname]
                out = guarded(f"{key} {stage} {vname}", lambda: run_stage(
                    stage, d, variant, device, smoke, 1, 3, acc={} if mode == "bd" else None, profile=mode == "pf"))
                if out:
                    res.setdefault(key, {}).setdefault(stage, {})[vname] = out
                    if mode == "pf":
                        print_profile(stage, out)
                continue
            variant = VARIANTS_BY_STAGE[stage][name]
            out = guarded(f"stage {stage} {name}", lambda: run_stage(stage, d, variant, device, smoke, warmup, iters))
            if out:
                out.update(projections(stage, out["ms_per_update"], out["views_per_update"]))
                res["stages"].setdefault(stage, {})[name] = out
        d.unload()
        del d
        free(device)

    summarise(res)
    save()
    print_table(res)
    print(f"\nwrote {path} ({time.perf_counter() - t_start:.0f} s)")
    return res


def options_refiner(d, res, guarded, device, smoke, warmup, iters, load) -> None:
    """Precision / memory options, measured on stage 3 (the largest): without the VAE checkpointing the default
    turns on for 1024 px encodes (faster, more memory), the VAE in float32 (exact; the default is bfloat16 for
    this force_upcast VAE on bf16 GPUs), and ``cpu_offload`` (text encoders on the CPU, the VAE on the card only
    while a stage runs). Not measured: UNet checkpointing for the LoRA step (SceneDenoiser.train_step runs
    backward after leaving its scene-call context, so a recomputation would see a different network)."""
    variant = {"nvdiffrast": True, "compile": True, "fast": True} if device.type == "cuda" else {}

    def vae_option(dtype: torch.dtype, checkpointing):
        g = torch.Generator(device=device).manual_seed(0)
        px = 16 if smoke else 1024
        img = torch.rand(1, 3, px, px, device=device, generator=g)
        old = d.vae_dtype
        d.vae.to(torch.float32)
        d.vae_dtype = torch.float32
        with torch.no_grad():
            z32 = d.encode_images(img, sample=False)
        d.vae.to(dtype)
        d.vae_dtype = dtype
        old_ckpt = d.vae_checkpointing

        def set_checkpointing(value):  # True / False for every encode; "large": encode_images decides per size
            if value:
                d.vae.enable_gradient_checkpointing()
            else:
                d.vae.disable_gradient_checkpointing()
            d.vae_checkpointing = value

        set_checkpointing(checkpointing)
        try:
            with torch.no_grad():
                err = rel_err(d.encode_images(img, sample=False), z32)
            out = run_stage("refine", d, variant, device, smoke, warmup, iters)
            out["latent_rel_err_vs_fp32"] = err
            out["vae_dtype"] = str(dtype)
            return out
        finally:
            set_checkpointing(old_ckpt)
            d.vae.to(old)
            d.vae_dtype = old

    low = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    for name, dt, ckpt in (("fast+no-vae-ckpt", low, False), ("fast+vae-fp32", torch.float32, "large")):
        out = guarded(f"option {name}", lambda: vae_option(dt, ckpt))
        if out:
            out.update(projections("refine", out["ms_per_update"], out["views_per_update"]))
            res["options"][name] = out

    def offload():
        d.unload()  # the offloaded copy is measured alone on the card
        free(device)
        od = load("sdxl_refiner", cpu_offload=True)
        try:
            return run_stage("refine", od, variant, device, smoke, warmup, iters)
        finally:
            od.unload()

    out = guarded("option fast+cpu_offload", offload)  # last: it unloads the shared denoiser
    if out:
        out.update(projections("refine", out["ms_per_update"], out["views_per_update"]))
        res["options"]["fast+cpu_offload"] = out


def summarise(res: Dict[str, object]) -> None:
    """Totals of the best variant per stage and the issue's targets (met / not met)."""
    best, total_ref, total_def, worst_vram = {}, 0.0, 0.0, 0.0
    for stage in ("nerf", "mesh", "refine"):
        runs = res["stages"].get(stage)
        if not runs:
            continue
        name = "fast" if "fast" in runs else min(runs, key=lambda k: runs[k]["ms_per_update"])
        best[stage] = name
        total_ref += runs[name]["reference_s"]
        total_def += runs[name]["default_s"]
        v = runs[name]["peak_vram_gib"]
        worst_vram = max(worst_vram, v) if math.isfinite(v) and math.isfinite(worst_vram) else float("nan")
    complete = len(best) == 3
    vram_known = bool(best) and math.isfinite(worst_vram)
    fractions = [p.get("cfg_best_fraction_of_peak") for p in res["pieces"].values() if isinstance(p, dict)]
    fractions = [f for f in fractions if f is not None]
    res["summary"] = {
        "variant_used": best, "reference_total_min": total_ref / 60 if complete else None,
        "default_total_min": total_def / 60 if complete else None, "peak_vram_gib": worst_vram if vram_known else None,
        "targets": {
            f"reference workload <= {TARGET_MINUTES:g} min": (total_ref / 60 <= TARGET_MINUTES) if complete else None,
            f"peak VRAM <= {TARGET_VRAM_GB:g} GB": (worst_vram * 2 ** 30 / 1e9 <= TARGET_VRAM_GB) if vram_known else None,
            f"UNet >= {TARGET_PEAK_FRACTION:.0%} of fp16 peak": (min(fractions) >= TARGET_PEAK_FRACTION) if fractions else None,
        }}


def print_table(res: Dict[str, object]) -> None:
    print(f"\n== {res['card']} | torch {res['torch']} | {res['date']}")
    pk = res.get("matmul_peak") or {}
    print(f"fp16 matmul peak: {pk.get('tflops', float('nan')):.0f} TFLOP/s ({pk.get('n')}^3)")
    for kind, p in res["pieces"].items():
        if "cfg_tflop" not in p:
            continue
        print(f"{kind}: CFG call B={p['cfg_batch']} {p['latent']}^2: {p['cfg_tflop']:.2f} TFLOP; eager "
              f"{p['cfg_eager_ms']:.1f} ms ({p['cfg_eager_tflops']:.0f} TFLOP/s)"
              + (f"; graph {p['cfg_graph_ms']:.1f} ms ({p['cfg_graph_tflops']:.0f} TFLOP/s, rel err "
                 f"{p['cfg_graph_rel_err']:.1e})" if "cfg_graph_ms" in p else "")
              + f"; best {p['cfg_best_fraction_of_peak']:.0%} of peak")
        print(f"   scene eps eager {p.get('scene_eps_eager_ms', float('nan')):.1f} ms / graph "
              f"{p.get('scene_eps_graph_ms', float('nan')):.1f} ms; LoRA step foreach "
              f"{p.get('lora_step_foreach_ms', float('nan')):.1f} ms / fused {p.get('lora_step_fused_ms', float('nan')):.1f}"
              f" ms / graph+fused {p.get('lora_step_graph_fused_ms', float('nan')):.1f} ms;"
              f" VAE fwd+bwd {p.get('vae_fwd_bwd_ms', float('nan')):.1f} ms / compiled "
              f"{p.get('vae_fwd_bwd_fast_ms', float('nan')):.1f} ms ({p.get('vae_dtype')})")
    print(f"\n{'stage':<7} {'variant':<20} {'ms/upd':>8} {'views/s':>8} {'peak GiB':>9} {'ref min':>8} {'dflt min':>8} {'1st upd s':>9}")
    rows = [(s, n, r) for s, runs in res["stages"].items() for n, r in runs.items()]
    rows += [("option", n[:20], r) for n, r in res["options"].items()]
    for s, n, r in rows:
        print(f"{s:<7} {n:<20} {r['ms_per_update']:>8.1f} {r['views_per_s']:>8.1f} {r['peak_vram_gib']:>9.2f} "
              f"{r['reference_s'] / 60 if 'reference_s' in r else float('nan'):>8.2f} "
              f"{r['default_s'] / 60 if 'default_s' in r else float('nan'):>8.2f} {r['first_update_s']:>9.1f}")
    if res["breakdown"]:
        keys = ["render", "vae encode", "cfg unet", "lora fwd", "scene eps + rest of guidance", "lora step",
                "backward + optimiser + rest"]
        print("\nper-update breakdown, ms (synced timers, 3 updates: attribution only)")
        print(f"{'stage':<7} {'variant':<8} {'total':>7} " + " ".join(f"{' '.join(k.split(' ')[:2])[:9]:>9}" for k in keys))
        for stage, runs in res["breakdown"].items():
            for name, r in runs.items():
                b = r["breakdown_ms"]
                print(f"{stage:<7} {name:<8} {r['ms_per_update']:>7.1f} " + " ".join(f"{b.get(k, 0.0):>9.1f}" for k in keys))
    sm = res.get("summary", {})
    print(f"\ntotal (variant per stage {sm.get('variant_used')}): reference {sm.get('reference_total_min')} min, "
          f"default {sm.get('default_total_min')} min, peak VRAM {sm.get('peak_vram_gib')} GiB")
    for k, v in (sm.get("targets") or {}).items():
        print(f"  {k}: {'met' if v else ('NOT met' if v is False else 'not measured')}")
    for e in res["errors"]:
        print("error:", e)
    if res["skipped"]:
        print("skipped:", ", ".join(res["skipped"]))


if __name__ == "__main__":
    main()
