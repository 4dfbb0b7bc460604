"""Micro-measurements that pick the next speed levers (issue 6): one device call, prints a table.

Each row times one candidate change in isolation, on random-weight networks of the real architectures
(bench_gpu.random_denoiser), replayed from a CUDA graph where the stage code replays it:

* UNet memory format (NCHW / channels_last), cuDNN autotuning, torch.compile (default mode), batch size;
* VAE encode + backward dtype / memory format at the stage sizes;
* the NeRF field's forward + backward per million points: compiled grid only vs the whole field compiled,
  float32 vs float16 MLPs.

    python bench/probe_speed.py [--skip-compile] [--only unet,vae,field,vaeprof,vae2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_gpu import median_ms, peak_gib, peak_reset, random_denoiser, free  # noqa: E402

ROWS = []


def row(what, ms, extra=""):
    ROWS.append((what, ms, extra))
    print(f"{what:<60} {ms:9.2f} ms  {extra}", flush=True)


def graphed(fn, warmup=3):
    """Capture ``fn`` (no args) in a CUDA graph after ``warmup`` side-stream calls; returns replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def unet_probe(name, B, latent, skip_compile, peak):
    from torch.utils.flop_counter import FlopCounterMode

    dev = torch.device("cuda")
    d = random_denoiser(name, dev, torch.float16)
    unet = d.unet
    g = torch.Generator(device=dev).manual_seed(0)
    hid_dim = unet.config.cross_attention_dim
    for b in B:
        x = torch.randn(b, unet.config.in_channels, latent, latent, device=dev, dtype=torch.float16, generator=g)
        t = torch.full((b,), 500.0, device=dev)
        hid = torch.randn(b, 77, hid_dim, device=dev, dtype=torch.float16, generator=g)
        added = None
        if d.kind == "sdxl_refiner":
            added = {"text_embeds": torch.randn(b, 1280, device=dev, dtype=torch.float16, generator=g),
                     "time_ids": torch.randn(b, 5, device=dev, dtype=torch.float16, generator=g)}

        def call(u=unet, xx=x):
            with torch.no_grad():
                return u(xx, t, encoder_hidden_states=hid, added_cond_kwargs=added).sample

        fc = FlopCounterMode(display=False)
        with fc:
            call()
        tf = fc.get_total_flops() / 1e12

        def rep(label, fn):
            ms = median_ms(graphed(fn), dev, 20)
            row(f"{name} UNet b{b} {latent}^2 {label}", ms, f"{tf / ms * 1e3:.0f} TFLOP/s = {tf / ms * 1e3 / peak:.0%}")

        rep("graph NCHW", call)
        if not skip_compile and b == B[0]:
            from dreamflow.denoisers.fast import compile_blocks, uncompile

            mods = compile_blocks(unet, "blocks")
            t0 = time.perf_counter()
            call()
            torch.cuda.synchronize()
            row(f"{name} compile time (blocks)", (time.perf_counter() - t0) * 1e3, "")
            rep("blocks compiled + graph", call)
            uncompile(mods)
            torch._dynamo.reset()
    vae = d.vae
    d = unet = None
    free(dev)
    return vae


def vae_probe(vae, name, B, size):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    img = torch.rand(B, 3, size, size, device=dev, generator=g)
    for dtype in ((torch.float32, torch.bfloat16) if name == "refiner" else (torch.float16,)):
        for cl in (False, True):
            vae.to(dtype=dtype, memory_format=torch.channels_last if cl else torch.contiguous_format)
            x = img.to(dtype).contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
            x = x.detach().requires_grad_(True)

            def step():
                z = vae.encode(x).latent_dist.mean
                z.float().square().mean().backward()
                return z

            torch.backends.cudnn.benchmark = True
            peak_reset(dev)
            try:
                ms = median_ms(step, dev, 5, warmup=2)
                z = step()
                fin = bool(torch.isfinite(z).all()) and bool(torch.isfinite(x.grad).all())
                row(f"{name} VAE enc fwd+bwd {B}x{size}^2 {str(dtype)[6:]} {'CL' if cl else 'NCHW'}", ms,
                    f"peak {peak_gib(dev):.1f} GiB finite={fin}")
            except torch.cuda.OutOfMemoryError:
                row(f"{name} VAE {str(dtype)[6:]} {'CL' if cl else 'NCHW'}", float("nan"), "OOM")
            x.grad = None
    vae.to(dtype=torch.float32, memory_format=torch.contiguous_format)
    free(dev)


def vae_profile(name, B, size, dtype):
    """Top CUDA kernels of one VAE encode + backward (where the time goes)."""
    from torch.profiler import ProfilerActivity, profile

    dev = torch.device("cuda")
    d = random_denoiser(name, dev, torch.float16)
    vae = d.vae.to(dtype)
    d = None
    free(dev)
    img = torch.rand(B, 3, size, size, device=dev, dtype=dtype, requires_grad=True)

    def step():
        z = vae.encode(img).latent_dist.mean
        z.float().square().mean().backward()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))
    return vae


def vae_compile_probe(name, B, size, dtype, variants, profile_variants=(), out_dir=None):
    """VAE encode + backward under the ways it could be compiled (issue 6, stage 3's biggest piece):
    ``blocks`` = the fast path's default (the encoder's ResnetBlock2D compiled), ``encoder`` = the whole
    encoder compiled; ``mm`` = :class:`MatmulAttention` (bfloat16 maths for a float16 VAE: the fast path's choice),
    ``mm16`` = in the VAE's own dtype; ``CL`` = channels_last
    weights and input (cuDNN's native layout for tensor-core convs; in
    eager mode GroupNorm is slow there, compiled GroupNorm is not). Prints ms, peak GiB, compile seconds and,
    for ``profile_variants``, the top kernels (the whole table goes to ``out_dir``)."""
    from torch.profiler import ProfilerActivity, profile

    from dreamflow.denoisers.fast import compile_blocks, uncompile

    dev = torch.device("cuda")
    d = random_denoiser(name, dev, torch.float16)
    vae = d.vae.to(dtype)
    d = None
    free(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    img0 = torch.rand(B, 3, size, size, device=dev, generator=g, dtype=dtype)
    for v in variants:
        cl = v.endswith("CL")
        fmt = torch.channels_last if cl else torch.contiguous_format
        vae.to(memory_format=fmt)
        img = img0.contiguous(memory_format=fmt).requires_grad_(True)
        mods = []
        if v.startswith("blocks"):
            mods = compile_blocks(vae.encoder, "blocks", blocks=("ResnetBlock2D",))
        elif v.startswith("encoder"):
            mods = compile_blocks(vae.encoder, "unet")
        if "ckpt" in v:
            vae.enable_gradient_checkpointing()
        attn = []
        if {"mm", "mm16"} & set(v.split()):  # MatmulAttention: "mm" bfloat16 maths for a float16 VAE, "mm16" its dtype
            from dreamflow.denoisers.fast import use_matmul_attention

            attn = use_matmul_attention(vae, torch.bfloat16 if dtype == torch.float16 and "mm" in v.split() else None)

        def step():
            z = vae.encode(img).latent_dist.mean
            z.float().square().mean().backward()

        t0 = time.perf_counter()
        try:
            step()
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            peak_reset(dev)
            ms = median_ms(step, dev, 5, warmup=1)
            row(f"{name} VAE {B}x{size}^2 {str(dtype)[6:]} {v}", ms, f"peak {peak_gib(dev):.1f} GiB, first call {first:.0f} s")
            img.grad = None
            step()  # one clean gradient to compare
            if v == variants[0]:
                ref = img.grad.detach().clone()
            else:
                row(f"  input-gradient rel. diff vs {variants[0]}", float(
                    (img.grad.double() - ref.double()).norm() / ref.double().norm()), "")
            if v in profile_variants:
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    step()
                    torch.cuda.synchronize()
                table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=100)
                if out_dir:
                    with open(os.path.join(out_dir, f"vaeprof_{name}_{v.replace(' ', '-')}.txt"), "w") as f:
                        f.write(table)
                ka = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:18]
                for e in ka:
                    print(f"    {e.device_time_total / 1e3:8.2f} ms {e.count:5d}x  {e.key[:100]}", flush=True)
        except Exception as e:  # noqa: BLE001 (a probe: report and go on)
            row(f"{name} VAE {v}", float("nan"), f"{type(e).__name__}: {str(e)[:120]}")
        finally:
            if "ckpt" in v:
                vae.disable_gradient_checkpointing()
            for m, processor in attn:
                m.set_processor(processor)
            uncompile(mods)
            torch._dynamo.reset()
            img.grad = None
            free(dev)
    vae.to(memory_format=torch.contiguous_format)


def field_probe(n_points):
    from dreamflow.scene.hashgrid import HashGridConfig
    from dreamflow.scene.nerf import NeRFField, NeRFFieldConfig

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    pts = (torch.rand(n_points, 3, device=dev, generator=g) * 2 - 1) * 0.8
    for label, grid_compile, whole, half in (("grid compiled", True, False, False),
                                              ("grid compiled, MLP autocast fp16", True, False, True),
                                              ("whole field compiled", False, True, False),
                                              ("whole field compiled, autocast fp16", False, True, True)):
        torch.manual_seed(0)
        field = NeRFField(NeRFFieldConfig(grid=HashGridConfig(compile=grid_compile))).to(dev)
        fn = (lambda p: field(p)) if not whole else torch.compile(lambda p: field(p))

        def step():
            with torch.autocast("cuda", dtype=torch.float16, enabled=half):
                out = fn(pts)
                loss = out["density"].float().mean() + out["albedo"].float().mean()
            loss.backward()

        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        peak_reset(dev)
        ms = median_ms(step, dev, 5, warmup=1)
        row(f"field fwd+bwd {n_points / 1e6:.0f}M pts {label}", ms,
            f"{ms / n_points * 1e6:.2f} ms/Mpt peak {peak_gib(dev):.1f} GiB first {first:.0f}s")

        def fwd():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=half):
                return field.density(pts)

        ms = median_ms(fwd, dev, 5, warmup=1)
        row(f"field density no-grad {n_points / 1e6:.0f}M pts {label} (eager MLP)", ms, "")
        field = None
        torch._dynamo.reset()
        free(dev)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--only", default="unet,vae,field")
    ap.add_argument("--points", type=float, default=8e6)
    ap.add_argument("--vae-variants", default="blocks,blocks CL,encoder CL,blocks ckpt",
                    help="vae2: comma-separated, from eager / blocks / encoder [+ CL] [+ ckpt] [+ mm | mm16]")
    ap.add_argument("--vae-model", default="refiner", choices=["refiner", "sd21"],
                    help="vae2: the refiner's VAE (2 x 1024 px bf16) or SD 2.1's (4 x 512 px fp16)")
    ap.add_argument("--vae-profile", default="blocks", help="vae2: variants whose top kernels are printed")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = torch.device("cuda")
    A = torch.randn(8192, 8192, device=dev, dtype=torch.float16)
    peak = 2 * 8192 ** 3 / median_ms(lambda: A @ A, dev, 20) / 1e9
    row("fp16 matmul 8192^3 peak", 2 * 8192 ** 3 / peak / 1e9, f"{peak:.0f} TFLOP/s")
    A = None
    only = a.only.split(",")
    if "vae2" in only:
        out_dir = os.environ.get("OUT")
        model, B, size, dtype = (("sd21-base", 4, 512, torch.float16) if a.vae_model == "sd21" else
                                 ("sdxl-refiner", 2, 1024, torch.bfloat16))
        vae_compile_probe(model, B, size, dtype, a.vae_variants.split(","),
                          profile_variants=tuple(a.vae_profile.split(",")), out_dir=out_dir)
    if "vaeprof" in only:
        vae = vae_profile("sdxl-refiner", 2, 1024, torch.bfloat16)
        vae_probe(vae, "refiner", 2, 1024)
        vae = None
        free(dev)
    if "field" in only:
        field_probe(int(a.points))
    if "unet" in only or "vae" in only:
        vae = unet_probe("sd21-base", [8], 64, a.skip_compile, peak) if "unet" in only else None
        if "vae" in only and vae is not None:
            vae_probe(vae, "sd21", 4, 512)
        del vae
        free(dev)
        vae = unet_probe("sdxl-refiner", [4], 128, a.skip_compile, peak) if "unet" in only else None
        if "vae" in only and vae is not None:
            vae_probe(vae, "refiner", 2, 1024)
    print("\n| what | ms | note |\n| --- | ---: | --- |")
    for w, ms, e in ROWS:
        print(f"| {w} | {ms:.2f} | {e} |")


if __name__ == "__main__":
    main()
