"""GPU memory presets (``dreamflow/denoisers/memory.py``): the low_vram preset switches every lever on (text encoders
off the device after encoding, VAE home on the CPU, UNet and VAE gradient checkpointing, views per update scaled
with the updates), the checkpointed LoRA step gives the same gradients as the plain one, and the stages run the
fitted views. CPU only: the device-side figures are bench/bench_lowvram.py's (bench/RESULTS.md).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dreamflow.denoisers import Denoiser, SceneDenoiser
from dreamflow.denoisers.loading import load_components
from dreamflow.denoisers import memory as memory_mod
from dreamflow.denoisers.memory import (MEMORY_PRESETS, MemoryConfig, apply_allocator, memory_config, preset_name,
                                       views_that_fit)
from dreamflow.denoisers.settings import DenoiserConfig
from dreamflow.errors import DreamFlowError
from dreamflow.guidance import TimestepSchedule
from dreamflow.stages import MeshStageConfig, NeRFStageConfig, RefineConfig, run_refine_stage
from dreamflow.stages.common import fit_views

pytestmark = pytest.mark.usefixtures("torch_single_thread")
PROMPT = "a red cube"


def _checkpointing(module) -> bool:
    flags = [m.gradient_checkpointing for m in module.modules() if hasattr(m, "gradient_checkpointing")]
    return bool(flags) and all(flags)


def _device_of(module) -> torch.device:
    return next(module.parameters()).device


@pytest.mark.parametrize("preset", ["default", "low_vram"])
def test_low_vram_switches_on_every_lever(tiny_sd_path, preset):
    """On a device that is not the CPU ("meta": every lever shows where a tensor lives), low_vram keeps the text
    encoders on the CPU in float32 with the embeddings on the device, homes the VAE on the CPU (on the device only
    inside ``vae_resident``), and checkpoints the UNet's and the VAE encoder's blocks; "default" keeps everything on
    the device and checkpoints nothing on a non-CUDA device."""
    low = preset == "low_vram"
    comps = load_components(tiny_sd_path, dtype=torch.float32, text_dtype=torch.float32, vae_dtype=torch.float32)
    meta = torch.device("meta")
    d = Denoiser(comps, name="tiny", device=meta, dtype=torch.float16, memory=preset)
    assert d.memory == MEMORY_PRESETS[preset] and preset_name(d.memory) == preset
    embeds = d.encode_prompt(["a red cube, side view", "a red cube, back view"], "blurry")
    assert embeds.cond.device == meta and embeds.cond.dtype == torch.float16  # cached where the UNet reads them
    assert _device_of(d.text_encoder) == (torch.device("cpu") if low else meta)
    assert next(d.text_encoder.parameters()).dtype == (torch.float32 if low else torch.float16)
    assert _device_of(d.unet) == meta
    assert _device_of(d.vae) == (torch.device("cpu") if low else meta)
    assert d.unet_checkpointing is low and _checkpointing(d.unet) is low
    assert d.vae_checkpointing is low and _checkpointing(d.vae.encoder) is low
    moves = []
    real_to = d.vae.to

    def spy(device):  # a meta tensor has no data to copy back: record the move, make empty weights there
        moves.append(torch.device(device))
        return d.vae.to_empty(device=device) if _device_of(d.vae) == meta else real_to(device)

    d.vae.to = spy
    with d.vae_resident():
        assert _device_of(d.vae) == meta
    assert _device_of(d.vae) == (torch.device("cpu") if low else meta)
    assert moves == ([meta, torch.device("cpu")] if low else [])


@pytest.mark.parametrize("preset,backend,env,expect", [
    ("low_vram", "native", "", "expandable"),
    ("low_vram", "native", "expandable_segments:True", "already"),
    ("low_vram", "native", "max_split_size_mb:128,expandable_segments:False", "user"),
    ("low_vram", "native", "max_split_size_mb:128", "expandable"),
    ("low_vram", "cudaMallocAsync", "backend:cudaMallocAsync", "already"),
    ("default", "native", "", "unchanged"),
])
def test_low_vram_asks_the_cuda_allocator_for_growable_segments(monkeypatch, preset, backend, env, expect):
    """On CUDA, low_vram turns the caching allocator's expandable segments on once (the refine stage fitted the
    cap only so, bench/RESULTS.md); a process already on them or on cudaMallocAsync (ComfyUI's default) is left as
    it is, a user whose PYTORCH_CUDA_ALLOC_CONF sets expandable_segments either way keeps their choice, and the
    "default" preset and non-CUDA devices change nothing."""
    calls = []
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: backend)
    monkeypatch.setattr(memory_mod, "_set_allocator_settings", calls.append)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", env)
    assert apply_allocator(memory_config(preset), torch.device("cuda")) == expect
    assert calls == (["expandable_segments:True"] if expect == "expandable" else [])
    assert apply_allocator(memory_config(preset), torch.device("cpu")) == "unchanged" and len(calls) <= 1
    assert MEMORY_PRESETS["low_vram"].expandable_segments and not MEMORY_PRESETS["default"].expandable_segments


def test_explicit_arguments_win_over_the_preset(tiny_sd_path):
    d = Denoiser.load(tiny_sd_path, dtype="fp32", device="cpu", memory="low_vram", vae_checkpointing=False)
    assert d.vae_checkpointing is False and d.unet_checkpointing and d.cpu_offload
    d = Denoiser.load(tiny_sd_path, dtype="fp32", device="cpu", cpu_offload=True)
    assert d.cpu_offload and not d.unet_checkpointing and preset_name(d.memory) == "default"


def _lora_step(denoiser):
    """One scene-LoRA training step on fixed inputs: (loss, LoRA and camera-MLP gradients, weights after AdamW)."""
    scene = SceneDenoiser(denoiser, seed=1)
    try:
        g = torch.Generator().manual_seed(0)
        x0 = torch.randn(2, 4, 8, 8, generator=g)
        camera = torch.randn(2, 16, generator=g)
        embeds = denoiser.encode_prompt(["a red cube", "a blue cube"])
        step = scene.begin_step(x0, embeds, camera, t=torch.tensor([0.3, 0.7]), generator=torch.Generator().manual_seed(1))
        grads = {}
        loss = step.finish()
        for name, p in scene._lora.items():
            grads[name] = p.grad.clone()
        for name, p in scene.camera_mlp.named_parameters():
            grads["camera." + name] = p.grad.clone()
        weights = {k: v.detach().clone() for k, v in scene.state_tensors().items()}
        return loss, grads, weights
    finally:
        scene.remove()


def test_checkpointed_unet_gives_the_lora_the_same_step(tiny_sd_path):
    """Brute-force twin: the LoRA step with the UNet's blocks recomputed in the backward (low_vram) has the loss,
    gradients and AdamW result of the plain step (float32 CPU: bit for bit); the recomputation needs the LoRA on
    (``SceneDenoiser.backward_scope``): without it torch's checkpoint finds other tensors than the forward's."""
    plain = Denoiser.load(tiny_sd_path, dtype="fp32", device="cpu")
    checkpointed = Denoiser.load(tiny_sd_path, dtype="fp32", device="cpu", memory="low_vram")
    assert _checkpointing(checkpointed.unet) and not _checkpointing(plain.unet)
    loss_a, grads_a, weights_a = _lora_step(plain)
    loss_b, grads_b, weights_b = _lora_step(checkpointed)
    assert float(loss_a) == float(loss_b) > 0
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    assert sum(float(g.abs().sum()) for g in grads_a.values()) > 0  # the B matrices start at zero: A's are not
    for k in grads_a:
        assert torch.equal(grads_a[k], grads_b[k]), k
    for k in weights_a:
        assert torch.equal(weights_a[k], weights_b[k]), k

    scene = SceneDenoiser(checkpointed, seed=1)
    try:
        embeds = checkpointed.encode_prompt(["a red cube"])
        step = scene.begin_step(torch.randn(1, 4, 8, 8), embeds, torch.randn(1, 16), t=torch.tensor([0.5]))
        with pytest.raises(torch.utils.checkpoint.CheckpointError):
            step._loss.backward()  # outside the scope: the LoRA is off while the blocks are recomputed
    finally:
        scene.remove()


@pytest.mark.parametrize("views, px, limit, expect", [
    (4, 512, 1024 ** 2, (4, 1)),      # within the limit
    (4, 512, 2 * 512 ** 2, (2, 2)),   # NeRF / mesh stages under low_vram: 2 views, twice the updates
    (2, 1024, 2 * 512 ** 2, (1, 2)),  # refine stage under low_vram: 1 view, twice the updates
    (4, 768, 1024 ** 2, (1, 4)),      # SD 2.1 768-v at its native size
    (4, 1024, 2 * 1024 ** 2, (2, 2)),
    (6, 1024, 4 * 1024 ** 2, (3, 2)),  # 4 would fit, but does not divide 6: the same view-updates
    (5, 1024, 1024 ** 2 // 2, (1, 5)),  # nothing fits: 1 view
    (4, 1024, 0, (4, 1)),             # no limit
])
def test_views_that_fit(views, px, limit, expect):
    assert views_that_fit(views, px, MemoryConfig(max_view_pixels=limit)) == expect


def test_fit_views_keeps_view_updates_and_the_timestep_schedule():
    low = Denoiser.__new__(Denoiser)
    low.memory = memory_config("low_vram")
    nerf, mesh = NeRFStageConfig(), MeshStageConfig()
    for cfg, stage in ((nerf, "NeRFStage"), (mesh, "MeshStage")):  # 4 views at 512 px -> 2 views, twice the updates
        got = fit_views(cfg, low, stage)
        assert (got.views_per_update, got.iterations, got.guidance.updates_per_t) == \
            (cfg.views_per_update // 2, cfg.iterations * 2, cfg.guidance.updates_per_t * 2) == (2, got.iterations, 8)
    refine = RefineConfig()
    fitted = fit_views(refine, low, "SDXLRefine")
    assert (fitted.views_per_update, fitted.iterations, fitted.guidance.updates_per_t) == (1, 2000, 8)
    assert (refine.views_per_update, refine.iterations, refine.guidance.updates_per_t) == (2, 1000, 4)  # untouched
    assert fitted.views_per_update * fitted.iterations == refine.views_per_update * refine.iterations
    assert dataclasses.replace(fitted, views_per_update=2, iterations=1000,
                               guidance=refine.guidance) == refine  # nothing else changed
    assert fit_views(fitted, low, "SDXLRefine") is fitted  # fitting twice changes nothing
    # the same t_i for the same views: old update s and new updates 2s, 2s + 1
    g = refine.guidance
    old = TimestepSchedule(g.t_start, g.t_end, refine.iterations, g.updates_per_t)
    new = TimestepSchedule(g.t_start, g.t_end, fitted.iterations, fitted.guidance.updates_per_t)
    assert old.n_levels == new.n_levels
    for s in range(refine.iterations):
        assert old.at(s) == new.at(2 * s) == new.at(2 * s + 1)
    default = Denoiser.__new__(Denoiser)
    default.memory = memory_config("default")
    assert fit_views(refine, default, "SDXLRefine") is refine
    assert fit_views(refine, object(), "SDXLRefine") is refine  # a stand-in without a preset


def test_refine_stage_runs_the_fitted_views_with_every_lever(tiny_refiner_path, caplog):
    """The stage applies the preset: 2 views x 2 updates become 1 x 4 (logged, recorded in the state's settings
    and log), with the UNet checkpointed, the text encoder and the VAE homed on the CPU; losses finite."""
    from dreamflow.scene.hashgrid import HashGridConfig
    from dreamflow.scene.mesh import box_mesh
    from dreamflow.scene.nerf import Background, BackgroundConfig, NeRFField, NeRFFieldConfig
    from dreamflow.state import MeshState

    memory = dataclasses.replace(MEMORY_PRESETS["low_vram"], max_view_pixels=16 * 16)  # tiny: 1 view of 16 px
    refiner = Denoiser.load(tiny_refiner_path, dtype="fp32", device="cpu", memory=memory)
    assert refiner.unet_checkpointing and refiner.cpu_offload
    torch.manual_seed(0)
    grid = HashGridConfig(n_levels=2, log2_hashmap_size=8, base_resolution=4, per_level_scale=2.0, backend="torch")
    v, f = box_mesh(0.5)
    mesh = MeshState(field=NeRFField(NeRFFieldConfig(grid=grid, mlp_width=8)),
                     background=Background(BackgroundConfig(mlp_width=8)), prompt=PROMPT, vertices=v.float(),
                     faces=f.long())
    config = RefineConfig(iterations=2, views_per_update=2, resolution=24, denoise_resolution=16)
    with caplog.at_level("INFO", logger="dreamflow"):
        out = run_refine_stage(refiner, mesh, None, None, config)
    assert "runs 1 view(s) x 4 updates instead of 2 x 2" in caplog.text
    assert (out.settings["views_per_update"], out.settings["iterations"]) == (1, 4)
    assert out.settings["guidance"]["updates_per_t"] == 8
    assert [r["step"] for r in out.guidance_log] == [0, 1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in out.guidance_log)
    assert _device_of(refiner.vae) == torch.device("cpu")


def test_presets_and_settings_refuse_unknown_names():
    with pytest.raises(DreamFlowError, match="memory preset 'huge' is unknown; use one of: default, low_vram"):
        memory_config("huge")
    with pytest.raises(DreamFlowError, match="max_view_pixels"):
        memory_config(MemoryConfig(max_view_pixels=-1))
    assert memory_config(None) == MemoryConfig() and memory_config("low_vram") is not MEMORY_PRESETS["low_vram"]
    assert preset_name(MemoryConfig(max_view_pixels=7)) == "custom"
    with pytest.raises(DreamFlowError, match="LoadDenoiser memory='huge' is unknown; use one of: default, low_vram"):
        DenoiserConfig("m", memory="huge").validate()
    with pytest.raises(DreamFlowError, match="fast_path='turbo' is unknown"):
        DenoiserConfig("m", fast_path="turbo").validate()
    assert DenoiserConfig("m", device="cpu", fast_path="graphs").key() == DenoiserConfig("m", device="cpu").key()
    assert DenoiserConfig("m", device="cpu", memory="low_vram").key() != DenoiserConfig("m", device="cpu").key()


# ---------------------------------------------------------------------------------------------- GPU
CUDA = torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("which", ["tiny_sd_path", "tiny_refiner_path"])
def test_checkpointed_lora_step_on_cuda_eager_and_graphed_match_the_plain_step(which, request):
    """float16 on CUDA, under autocast: the low_vram LoRA steps (UNet recomputed in the backward), eager and with
    their forward / backward captured in CUDA graphs (the recomputation inside the backward graph), give the losses
    and LoRA weights of the plain eager steps (graphs without compilation: the eager kernels)."""
    from dreamflow.denoisers import SceneLoRAConfig
    from dreamflow.denoisers.fast import FastPathConfig
    from dreamflow.denoisers.graphs import GraphedSceneOutput

    path = request.getfixturevalue(which)
    embeds = {}

    def train(memory: str, graphed: bool):
        den = Denoiser.load(path, dtype="fp16", device="cuda", memory=memory)
        g = torch.Generator(device="cuda").manual_seed(7)
        x0 = torch.randn(2, 4, 8, 8, device="cuda", generator=g)
        cam = torch.randn(2, 16, device="cuda", generator=g)
        # one set of embeddings for every run: low_vram encodes the prompts on the CPU in float32, the plain run on
        # the GPU in float16, and the subject here is the LoRA step, not the text encoder's precision
        if "e" not in embeds:
            embeds["e"] = den.encode_prompt(["a red cube, side view", "a red cube, back view"], "blurry")
        e = embeds["e"]
        scene = SceneDenoiser(den, SceneLoRAConfig(lr=1e-2, camera_dropout=0.5), seed=3)
        if graphed:
            fast = den.enable_fast_path(FastPathConfig(compile="off", vae_matmul_attention=False))
            scene.graphed_output = GraphedSceneOutput(scene, fast)
        gen = torch.Generator(device="cuda").manual_seed(11)
        losses = [float(scene.train_step(x0, e, cam, generator=gen)) for _ in range(4)]
        weights = {k: v.clone() for k, v in scene.state_tensors().items()}
        replays = scene.graphed_output.graphs.replays if graphed else 0
        scene.remove()
        den.unload()
        return losses, weights, replays

    l_p, w_p, _ = train("default", False)
    for graphed in (False, True):
        l_c, w_c, replays = train("low_vram", graphed)
        assert replays == (4 if graphed else 0)
        assert l_c == pytest.approx(l_p, rel=1e-4) and len(set(l_p)) > 1
        for k in w_p:
            if w_p[k].norm() > 0:
                assert float((w_c[k] - w_p[k]).double().norm() / w_p[k].double().norm()) <= 1e-4, (graphed, k)
