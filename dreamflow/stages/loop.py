"""The optimisation loop shared by every stage (NeRF, mesh, SDXL refine).

One update (read as numbered steps):

1. draw ``views_per_update`` random cameras (stratified azimuth; seeded);
2. render the scene -> rgb [V, H, W, 3] and the stage's regularisers;
3. resize to ``denoise_resolution`` and encode to latents with the denoiser's VAE (differentiable);
4. view-dependent prompts ("..., side view") -> cached text embeddings;
5. guidance (APFO / SDS / VSD) -> loss on the latents (+ its own LoRA step);
6. backward, check the loss is finite (else stop with the step number, keeping the last good state), step;
7. progress, live preview and interrupt callbacks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from ..errors import DivergenceError, DreamFlowError, is_out_of_memory, memory_kind
from ..guidance import make_guidance
from ..hosting import Callbacks, make_room, raise_interrupt
from ..seeding import SEED_VAE_SAMPLE, derived_seed
from ..render.cameras import sample_cameras, view_prompt


def to_pil(image: torch.Tensor):
    """[H, W, 3] float in [0, 1] -> PIL image."""
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(arr)


def _log_row(step: int, loss: torch.Tensor, log: Dict[str, object]) -> Dict[str, float]:
    row = {"step": step, "loss": float(loss)}
    for k, v in log.items():
        if v is None:
            continue
        row[k] = float(v) if isinstance(v, (torch.Tensor, float, int)) else v
    return row


#: Largest parameter magnitude a stage may reach. Adam moves a parameter by about ``lr`` per update, so within
#: the nodes' ranges (lr <= 1, <= 100,000 updates) no parameter passes 1e5; beyond 1e6 the run has blown up
#: (absurd learning rates through the engine API), even while its loss still looks finite.
PARAM_BOUND = 1e6


class _Guard:
    """Divergence by the parameters, checked at every log flush (no extra host sync per update): every
    parameter finite and within :data:`PARAM_BOUND`. The last parameters that passed are kept (one device copy)
    and put back when a check fails, so the stage's snapshot is the last good state."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.good = [p.detach().clone() for p in self.params]
        self.good_step = 0

    def largest(self) -> float:
        if not self.params:
            return 0.0
        return float(torch.stack([p.detach().abs().amax().float() for p in self.params if p.numel()]).max())

    def check(self, step: int) -> Optional[str]:
        """``None`` and remember the parameters when they are sane, else restore the last good ones and say why."""
        big = self.largest()
        if math.isfinite(big) and big <= PARAM_BOUND:
            with torch.no_grad():
                for g, p in zip(self.good, self.params):
                    g.copy_(p.detach())
            self.good_step = step
            return None
        self.restore()
        return f"parameters reached {big:.3g} (limit {PARAM_BOUND:.0e})"

    def restore(self) -> None:
        with torch.no_grad():
            for g, p in zip(self.good, self.params):
                p.copy_(g)


@dataclass
class LoopResult:
    log: List[Dict[str, float]]
    guidance_state: Dict[str, torch.Tensor]


def oom_message(stage: str, config, kind: str = "GPU") -> str:
    v, r = config.views_per_update, config.resolution
    tail = "or LoadDenoiser memory=low_vram (offload and checkpointing; README 'Memory')" if kind == "GPU" else "or close other programs"
    grid = getattr(getattr(getattr(config, "nerf", None), "grid", None), "log2_hashmap_size", None)
    if grid is not None and grid > 16:  # the NeRF's hash grid (and its Adam moments) can be the big part
        tail = f"grid_log2_size={grid - 2}, " + tail
    return (f"{stage} ran out of {kind} memory at {v} views x {r} px (denoise {config.denoise_resolution} px); "
            f"try views_per_update={max(1, v // 2)}, resolution={max(64, r // 2)}, {tail}")


def autograd_on(fn):
    """Decorator: run a stage with autograd on, whatever the host does (ComfyUI executes nodes under
    ``torch.inference_mode()``, where modules built and optimised by a stage could not be trained)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False), torch.enable_grad():
            return fn(*args, **kwargs)

    return wrapper


def optimise(*, stage: str, denoiser, prompt: str, negative_prompt: str, config,
             render_fn: Callable, optimizer: torch.optim.Optimizer, snapshot: Callable[[List[dict]], object],
             callbacks: Optional[Callbacks] = None, guidance_state: Optional[Dict[str, torch.Tensor]] = None,
             on_step: Optional[Callable[[int], None]] = None,
             preview_fn: Optional[Callable[[], torch.Tensor]] = None) -> LoopResult:
    """Run ``config.iterations`` updates of a stage.

    Args:
        render_fn: ``(cameras, step) -> (rgb [V,H,W,3], reg_loss scalar tensor)``.
        snapshot: ``(log) -> state`` builds the stage's state from the current parameters (used for the
            last good state on divergence).
        guidance_state: scene-LoRA tensors to resume from (APFO/VSD).
        on_step: called after each optimiser step (e.g. to refresh an occupancy grid).
        preview_fn: ``() -> [H, W, 3]`` image of the scene as the user will get it, for live previews (called
            after the update's optimiser step, under no_grad); default: the first training render.
    Returns:
        LoopResult with the log rows (t, sigma, grad_norm, loss, ...) and the guidance's LoRA tensors.
    Raises:
        DreamFlowInterrupted within one update of an interrupt; DivergenceError on a non-finite loss;
        DreamFlowError on CUDA out-of-memory, naming settings that would fit.
    """
    callbacks = callbacks or Callbacks()
    device = denoiser.device
    make_room(device, why=stage)  # in ComfyUI: its other models leave the card first (README "Sharing the GPU")
    total = int(config.iterations)
    cam_gen = torch.Generator().manual_seed(int(config.seed))
    # The VAE posterior sample is random too (threestudio samples it): seed it for reproducible runs.
    vae_gen = torch.Generator(device=device).manual_seed(derived_seed(config.seed, SEED_VAE_SAMPLE))
    guidance = make_guidance(denoiser, config.guidance, total, seed=int(config.seed))
    try:  # the guidance's LoRA sits on the shared UNet: remove it if resuming fails
        if guidance_state:
            guidance.load_state_tensors(guidance_state)
    except BaseException:
        guidance.close()
        raise
    log: List[dict] = []
    pending = []  # (step, loss, log) kept as tensors; converted in batches to avoid host syncs
    # With cpu_offload the VAE stays on the device while the stage runs (encode and its backward), and
    # returns to the CPU after it.
    resident = denoiser.vae_resident()
    guard = _Guard(optimizer)

    def blown(step: int, why: str) -> DivergenceError:
        log.extend(_log_row(s, l, g) for s, l, g in pending)
        pending.clear()
        return DivergenceError(
            f"{stage} diverged: {why} by update {step}; the last good state (after update {guard.good_step}) is kept "
            f"(lower the learning rates or cfg_scale, or change the seed)", step=step,
            last_good=snapshot([r for r in log if r["step"] < guard.good_step]))

    with resident:
        try:
            for step in range(total):
                if callbacks.should_stop():
                    raise_interrupt(f"{stage} interrupted at update {step}/{total}; nothing was written")
                cams_cpu = sample_cameras(config.camera, config.views_per_update, config.resolution, generator=cam_gen)
                words = cams_cpu.view_words(config.camera)  # from the CPU copy: no device -> host sync
                cams = cams_cpu.to(device)
                rgb, reg = render_fn(cams, step)
                images = rgb.permute(0, 3, 1, 2)
                if config.denoise_resolution != config.resolution:
                    images = F.interpolate(images, size=(config.denoise_resolution,) * 2, mode="bilinear", align_corners=False)
                latents = denoiser.encode_images(images, generator=vae_gen)
                embeds = denoiser.encode_prompt([view_prompt(prompt, w) for w in words], negative_prompt)
                try:
                    out = guidance(latents, embeds, cams.condition(), step)
                    loss = out.loss + reg
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    # One host sync per update, after the backward is queued (the GPU stays busy meanwhile) and
                    # before the step: a non-finite loss never reaches the parameters. It covers the LoRA's loss
                    # too (a fused LoRA optimiser skipped its own step on the device).
                    guidance.check_finite(loss, out.log)
                except DivergenceError as e:  # the scene loss, or the LoRA's (which counts its own steps)
                    log.extend(_log_row(s, l, g) for s, l, g in pending)
                    raise DivergenceError(
                        f"{stage} diverged: non-finite loss at update {step} ({e}); the last good state is kept "
                        f"(lower the learning rates or cfg_scale, or change the seed)", step=step, last_good=snapshot(log)) from None
                except RuntimeError as e:  # e.g. the LoRA's optimiser: "value cannot be converted ... without overflow"
                    if "overflow" not in str(e):
                        raise
                    guard.restore()
                    raise blown(step, f"an optimiser step overflowed ({e})") from None
                try:
                    optimizer.step()
                except RuntimeError as e:  # an absurd learning rate overflows Adam's float32 step size
                    if "overflow" not in str(e):
                        raise
                    guard.restore()
                    raise blown(step, f"an optimiser step overflowed ({e})") from None
                if on_step is not None:
                    on_step(step)
                pending.append((step, loss.detach(), out.log))
                if len(pending) >= 50 or step == total - 1:
                    why = guard.check(step + 1)
                    if why is not None:
                        raise blown(step, why)
                    log.extend(_log_row(s, l, g) for s, l, g in pending)
                    pending.clear()
                    if callbacks.log is not None:
                        callbacks.log(log[-1])
                if callbacks.progress is not None:
                    every = callbacks.preview_every
                    preview = None
                    if every and (step % every == 0 or step == total - 1):
                        if preview_fn is not None:
                            with torch.no_grad():
                                preview = to_pil(preview_fn())
                        else:
                            preview = to_pil(rgb[0])
                    callbacks.progress(step + 1, total, preview)
        except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as e:
            if not is_out_of_memory(e):
                raise
            raise DreamFlowError(oom_message(stage, config, memory_kind(e))) from None
        finally:
            state = guidance.state_tensors()
            guidance.close()
    return LoopResult(log=log, guidance_state=state)
