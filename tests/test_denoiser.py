"""Denoiser loading, errors, noise-schedule maths, CFG, prompts, VAE (tiny models built offline, CPU).

Tolerances: schedule conversions are compared to diffusers' DDPMScheduler in float32 at atol 1e-5 (both sides
compute sqrt / divide in float32; the only difference is operation order); UNet paths that should be the same
computation are compared exactly or at 1e-5 (batched 2B vs two B calls reorder float sums).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import types

import pytest
import torch

from dreamflow.denoisers import Denoiser, PromptEmbeds, list_models, pick_single_file_config, require_kind, resolve_model
from dreamflow.denoisers import loading
from dreamflow.denoisers.tiny import build_tiny_sd, save_as_single_file, unet_to_ldm, vae_to_ldm
from dreamflow.denoisers.tokenizer import build_clip_bpe, encode_reference
from dreamflow.errors import DreamFlowError


pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _copy(src: str, dst) -> str:
    dst = str(dst)
    shutil.copytree(src, dst)
    return dst


def _edit_index(folder: str, **changes) -> None:
    p = os.path.join(folder, "model_index.json")
    with open(p) as f:
        idx = json.load(f)
    idx.update(changes)
    with open(p, "w") as f:
        json.dump(idx, f)


# ------------------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_files_match_reference_bpe(tiny_sd_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(os.path.join(tiny_sd_path, "tokenizer"))
    vocab, merges = build_clip_bpe()
    for text in ["a red cube, front view", "overhead view of the corgi", "Zyx-quux!! 42", "héllo wörld's"]:
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert ids[1:-1] == encode_reference(text, vocab, merges), text
    # listed words are single tokens; unknown words fall back to bytes and still decode
    for w in ["a", "the", "red", "cube", "front", "side", "back", "overhead", "view"]:
        assert len(tok(w).input_ids) == 3, w
    assert len(tok("zyx").input_ids) == 2 + 3
    assert tok.decode(tok("zyx quux").input_ids, skip_special_tokens=True) == "zyx quux"
    padded = tok("a cube", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == tok.pad_token_id


def test_tiny_builder_is_fast_and_complete(tmp_path, tiny_sd_path):
    t0 = time.perf_counter()
    path = build_tiny_sd(str(tmp_path / "again"), seed=0)
    assert time.perf_counter() - t0 < 3.0
    for sub in ("unet", "vae", "text_encoder"):
        files = os.listdir(os.path.join(path, sub))
        assert "config.json" in files and any(f.endswith(".safetensors") for f in files)
        assert not any(f.endswith((".bin", ".pt", ".ckpt")) for f in files)
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(path, "tokenizer", f))
    # same seed -> same weights
    from safetensors.torch import load_file

    a = load_file(os.path.join(path, "unet", "diffusion_pytorch_model.safetensors"))
    b = load_file(os.path.join(tiny_sd_path, "unet", "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ loading
def test_both_kinds_load_through_from_pretrained(tiny_sd, tiny_sd_v_path, tiny_refiner, tiny_sd_path):
    from safetensors.torch import load_file

    assert tiny_sd.kind == "sd" and tiny_sd.prediction_type == "epsilon"
    assert tiny_sd.alphas_cumprod.shape == (1000,) and tiny_sd.alphas_cumprod.dtype == torch.float32
    assert (tiny_sd.latent_channels, tiny_sd.vae_scale_factor, tiny_sd.native_resolution) == (4, 2, 16)
    assert tiny_sd.text_encoder_2 is None and tiny_sd.tokenizer is not None
    # the weights in memory are the weights on disk
    disk = load_file(os.path.join(tiny_sd_path, "unet", "diffusion_pytorch_model.safetensors"))
    mem = tiny_sd.unet.state_dict()
    assert set(disk) == set(mem) and all(torch.equal(disk[k], mem[k]) for k in disk)
    for m in (tiny_sd.unet, tiny_sd.vae, tiny_sd.text_encoder):
        assert not m.training and not any(p.requires_grad for p in m.parameters())

    v = Denoiser.load(tiny_sd_v_path, dtype="fp32", device="cpu")
    assert v.kind == "sd" and v.prediction_type == "v_prediction"

    assert tiny_refiner.kind == "sdxl_refiner" and tiny_refiner.text_encoder is None
    assert tiny_refiner.text_encoder_2 is not None and tiny_refiner.vae.config.force_upcast
    # SD 1.x/2.x/SDXL scaled-linear schedule: alphas_cumprod[0] = 1 - 0.00085, [999] = 0.004660
    assert tiny_sd.alphas_cumprod[0].item() == pytest.approx(1 - 0.00085, abs=1e-7)
    assert tiny_sd.alphas_cumprod[-1].item() == pytest.approx(0.0046601, abs=1e-6)


def test_missing_name_lists_where_searched():
    with pytest.raises(DreamFlowError) as e:
        resolve_model("no-such-model-xyz")
    msg = str(e.value)
    assert "no-such-model-xyz" in msg and "not found" in msg and loading.REPO_MODELS_DIR in msg
    assert "\n" not in msg


def test_hosted_lookup_uses_comfy_folders(monkeypatch, tmp_path, tiny_sd_path):
    diff = tmp_path / "diffusers"
    ckpts = tmp_path / "checkpoints"
    diff.mkdir()
    ckpts.mkdir()
    os.symlink(tiny_sd_path, diff / "my-sd")
    (ckpts / "model.safetensors").write_bytes(b"x")
    (ckpts / "old.ckpt").write_bytes(b"x")
    fake = types.SimpleNamespace(
        get_folder_paths=lambda k: [str(diff)] if k == "diffusers" else [str(ckpts)],
        get_full_path=lambda k, n: str(ckpts / n) if (ckpts / n).exists() else None,
        get_filename_list=lambda k: sorted(os.listdir(ckpts)))
    monkeypatch.setattr(loading.hosting, "folder_paths", lambda: fake)
    assert resolve_model("my-sd") == str(diff / "my-sd")
    assert resolve_model("model.safetensors") == str(ckpts / "model.safetensors")
    names = list_models()
    assert "my-sd" in names and "model.safetensors" in names and "old.ckpt" not in names
    assert names == sorted(names)
    with pytest.raises(DreamFlowError, match=r"not found.*diffusers: .*checkpoints: .*my-sd"):
        resolve_model("nope")


def _fake_comfy_folders(monkeypatch, tmp_path):
    diff, ckpts = tmp_path / "diffusers", tmp_path / "checkpoints"
    diff.mkdir()
    ckpts.mkdir()
    fake = types.SimpleNamespace(
        get_folder_paths=lambda k: [str(diff)] if k == "diffusers" else [str(ckpts)],
        get_full_path=lambda k, n: str(ckpts / n) if (ckpts / n).exists() else None,
        get_filename_list=lambda k: sorted(os.listdir(ckpts)))
    monkeypatch.setattr(loading.hosting, "folder_paths", lambda: fake)
    return diff, ckpts


def _same_weights(a, b):
    for name in ("unet", "vae", "text_encoder"):
        x, y = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x), name


def test_a_model_name_finds_the_diffusers_folder_or_the_single_file(monkeypatch, tmp_path, tiny_sd, tiny_sd_path):
    """Workflows name SD 2.1-base by its diffusers folder name; a user may have that folder or the single-file
    checkpoint (and old workflows name the file): either name loads whichever form is there."""
    diff, ckpts = _fake_comfy_folders(monkeypatch, tmp_path)
    # only the diffusers folder
    os.symlink(tiny_sd_path, diff / "stable-diffusion-2-1-base")
    assert resolve_model("v2-1_512-ema-pruned.safetensors") == str(diff / "stable-diffusion-2-1-base")
    assert "stable-diffusion-2-1-base" in list_models()
    _same_weights(Denoiser.load("v2-1_512-ema-pruned.safetensors", device="cpu", dtype="fp32"), tiny_sd)
    # only the single file
    os.unlink(diff / "stable-diffusion-2-1-base")
    ckpt = save_as_single_file(tiny_sd_path, str(ckpts / "v2-1_512-ema-pruned.safetensors"))
    assert resolve_model("stable-diffusion-2-1-base") == ckpt
    names = list_models()  # the workflow's name is offered (ComfyUI only accepts listed values)
    assert "stable-diffusion-2-1-base" in names and "v2-1_512-ema-pruned.safetensors" in names
    monkeypatch.setattr(loading, "CONFIGS_DIR", os.path.dirname(tiny_sd_path))
    monkeypatch.setattr(loading, "pick_single_file_config", lambda shapes, get, where: os.path.basename(tiny_sd_path))
    monkeypatch.setenv(loading.TOKENIZER_ENV, os.path.join(tiny_sd_path, "tokenizer"))
    _same_weights(Denoiser.load("stable-diffusion-2-1-base", device="cpu", dtype="fp32"), tiny_sd)
    # a name found as itself wins over its aliases; other models' names do not cross over
    os.symlink(tiny_sd_path, diff / "stable-diffusion-2-1-base")
    assert resolve_model("v2-1_512-ema-pruned.safetensors") == ckpt
    assert resolve_model("stable-diffusion-2-1-base") == str(diff / "stable-diffusion-2-1-base")
    with pytest.raises(DreamFlowError, match=r"'stable-diffusion-xl-refiner-1.0' not found \(nor as "
                                             r"sd_xl_refiner_1.0.safetensors / "):
        resolve_model("stable-diffusion-xl-refiner-1.0")
    assert "stable-diffusion-xl-refiner-1.0" not in list_models()


def test_alias_groups_are_disjoint_and_name_their_folder_first():
    seen = set()
    for group in loading.MODEL_ALIASES:
        assert not group[0].endswith(".safetensors") and all(n.endswith(".safetensors") for n in group[1:])
        assert not seen & set(group)
        seen |= set(group)
    assert loading.aliases("v2-1_512-ema-pruned.safetensors")[0] == "stable-diffusion-2-1-base"
    assert loading.aliases("my-own-model") == ()


def test_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(DreamFlowError, match="no model_index.json"):
        Denoiser.load(str(tmp_path), device="cpu")


def test_unknown_pipeline_class_and_sdxl_base(tmp_path, tiny_sd_path):
    d = _copy(tiny_sd_path, tmp_path / "flux")
    _edit_index(d, _class_name="FluxPipeline")
    with pytest.raises(DreamFlowError) as e:
        Denoiser.load(d, device="cpu")
    assert "FluxPipeline" in str(e.value) and "StableDiffusionPipeline" in str(e.value)
    _edit_index(d, _class_name="StableDiffusionXLImg2ImgPipeline", text_encoder=["transformers", "CLIPTextModel"])
    with pytest.raises(DreamFlowError, match="SDXL base"):
        Denoiser.load(d, device="cpu")


def test_truncated_weights_name_the_file(tmp_path, tiny_sd_path):
    d = _copy(tiny_sd_path, tmp_path / "broken")
    f = os.path.join(d, "unet", "diffusion_pytorch_model.safetensors")
    data = open(f, "rb").read()
    with open(f, "wb") as fh:
        fh.write(data[: len(data) // 2])
    with pytest.raises(DreamFlowError) as e:
        Denoiser.load(d, device="cpu")
    msg = str(e.value)
    assert f in msg and "UNet" in msg and "corrupt" in msg and "\n" not in msg


def test_pickle_weights_are_refused(tmp_path, tiny_sd_path):
    d = _copy(tiny_sd_path, tmp_path / "pickled")
    os.remove(os.path.join(d, "vae", "diffusion_pytorch_model.safetensors"))
    (tmp_path / "pickled" / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(DreamFlowError, match=r"refusing to load vae weights .*\.bin.*safetensors"):
        Denoiser.load(d, device="cpu")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not loaded")
    with pytest.raises(DreamFlowError, match=r"refusing to load checkpoint .*model\.ckpt"):
        Denoiser.load(str(ckpt), device="cpu")


def test_bad_options_and_require_kind(tiny_sd, tiny_refiner, tiny_sd_path):
    with pytest.raises(DreamFlowError, match="dtype 'fp8'"):
        Denoiser.load(tiny_sd_path, dtype="fp8", device="cpu")
    assert require_kind(tiny_refiner, "sdxl_refiner", "SDXLRefine") is tiny_refiner
    with pytest.raises(DreamFlowError, match="SDXLRefine needs a SDXL refiner denoiser but got .*Stable Diffusion"):
        require_kind(tiny_sd, "sdxl_refiner", "SDXLRefine")
    with pytest.raises(DreamFlowError, match="NeRFStage needs a Stable Diffusion"):
        require_kind(None, "sd", "NeRFStage")


# ------------------------------------------------------------------------------------------------ single files
def test_single_file_checkpoint_loads_like_the_folder(tmp_path, monkeypatch, tiny_sd, tiny_sd_path):
    ckpt = save_as_single_file(tiny_sd_path, str(tmp_path / "tiny.safetensors"))
    # Real checkpoints pick a shipped config by shape; the tiny one has CLIP width 32, so point the picker at
    # the tiny folder (which holds model_index.json + component configs exactly like configs/sd15).
    monkeypatch.setattr(loading, "CONFIGS_DIR", os.path.dirname(tiny_sd_path))
    monkeypatch.setattr(loading, "pick_single_file_config", lambda shapes, get, where: os.path.basename(tiny_sd_path))
    monkeypatch.delenv(loading.TOKENIZER_ENV, raising=False)
    with pytest.raises(DreamFlowError, match=loading.TOKENIZER_ENV):
        Denoiser.load(ckpt, device="cpu")
    monkeypatch.setenv(loading.TOKENIZER_ENV, os.path.join(tiny_sd_path, "tokenizer"))
    single = Denoiser.load(ckpt, device="cpu", dtype="fp32")
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(single, name).state_dict(), getattr(tiny_sd, name).state_dict()
        assert set(a) == set(b), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    e1, e2 = single.encode_prompt("a red cube"), tiny_sd.encode_prompt("a red cube")
    assert torch.equal(e1.cond, e2.cond)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(single.predict_eps(x, 0.4, e1, 5.0), tiny_sd.predict_eps(x, 0.4, e2, 5.0))
    # a truncated single file is a clear error naming it
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(open(ckpt, "rb").read()[:5000])
    with pytest.raises(DreamFlowError, match="bad.safetensors.*(truncated|corrupt)"):
        Denoiser.load(str(bad), device="cpu")


def _ldm_shapes(config_name: str) -> dict:
    """Key -> shape of the original checkpoint a shipped config describes (models built on the meta device)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    root = os.path.join(loading.CONFIGS_DIR, config_name)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(os.path.join(root, "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(root, "vae")))
    sd = unet_to_ldm(unet.state_dict(), unet.config)
    sd.update(vae_to_ldm(vae.state_dict(), vae.config))
    # the config is what diffusers' own single-file converter expects: LDM keys map back onto every UNet/VAE key
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    back = convert_ldm_unet_checkpoint(dict(sd), dict(unet.config))
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    back = convert_ldm_vae_checkpoint(dict(sd), dict(vae.config))
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    return {k: tuple(v.shape) for k, v in sd.items()}, sum(p.numel() for p in unet.parameters())


def test_shipped_configs_and_checkpoint_picker():
    shapes, n15 = _ldm_shapes("sd15")
    assert n15 == 859_520_964  # published SD 1.5 UNet parameter count
    shapes[loading._K_CLIP_L] = (77, 768)
    assert pick_single_file_config(shapes) == "sd15"
    inpaint = dict(shapes)
    inpaint[loading._K_CONV_IN] = (320, 9, 3, 3)
    with pytest.raises(DreamFlowError, match="inpainting"):
        pick_single_file_config(inpaint)

    shapes, n21 = _ldm_shapes("sd21")
    assert n21 == 865_910_724  # published SD 2.x UNet parameter count
    shapes[loading._K_OPEN_CLIP] = (49408, 1024)
    probe = loading._K_VPRED_PROBE
    assert probe in shapes
    wide, narrow = torch.linspace(-1, 1, 1280), torch.linspace(-0.05, 0.05, 1280)
    assert pick_single_file_config(shapes, lambda k: wide) == "sd21"
    assert pick_single_file_config(shapes, lambda k: narrow) == "sd21-base"
    assert pick_single_file_config({**shapes, "v_pred": ()}, lambda k: narrow) == "sd21"

    shapes, _ = _ldm_shapes("sdxl-refiner")
    shapes[loading._K_XL_REFINER] = (1280, 1280)
    assert pick_single_file_config(shapes) == "sdxl-refiner"
    with pytest.raises(DreamFlowError, match="SDXL base"):
        pick_single_file_config({**shapes, loading._K_XL_BASE: (77, 1280)})
    with pytest.raises(DreamFlowError, match="cannot tell which model"):
        pick_single_file_config({"foo.weight": (3, 3)}, where="x.safetensors")

    for name, kind in [("sd15", "sd"), ("sd21", "sd"), ("sd21-base", "sd"), ("sdxl-refiner", "sdxl_refiner")]:
        root = os.path.join(loading.CONFIGS_DIR, name)
        assert loading.detect_kind(loading.read_model_index(root), root) == kind
        assert not any(f.endswith((".safetensors", ".bin")) for _, _, fs in os.walk(root) for f in fs)
    with open(os.path.join(loading.CONFIGS_DIR, "sd21", "scheduler", "scheduler_config.json")) as f:
        assert json.load(f)["prediction_type"] == "v_prediction"


# ------------------------------------------------------------------------------------------------ schedule maths
def _ddpm(den: Denoiser, prediction_type: str):
    from diffusers import DDPMScheduler

    s = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type=prediction_type, clip_sample=False)
    s.set_timesteps(1000)
    return s


def test_alpha_bar_interpolates_alphas_cumprod(tiny_sd):
    ac = tiny_sd.alphas_cumprod
    k = torch.tensor([0, 1, 10, 500, 998, 999])
    assert torch.allclose(tiny_sd.alpha_bar(k / 999.0), ac[k], atol=1e-6, rtol=0)
    mid = tiny_sd.alpha_bar((k[:-1] + 0.5) / 999.0)
    assert torch.allclose(mid, 0.5 * (ac[k[:-1]] + ac[k[:-1] + 1]), atol=1e-6, rtol=0)
    t = torch.linspace(0, 1, 101)
    a = tiny_sd.alpha_bar(t)
    assert torch.all(a[1:] < a[:-1])  # strictly decreasing in t
    assert torch.allclose(tiny_sd.sigma(t), ((1 - a) / a).sqrt())


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_conversions_match_diffusers_ddpm(tiny_sd, pred):
    s = _ddpm(tiny_sd, pred)
    g = torch.Generator().manual_seed(0)
    x0, eps, out = (torch.randn(4, 4, 8, 8, generator=g) for _ in range(3))
    k = torch.tensor([3, 250, 600, 990])
    t = k.float() / 999.0
    x_t = tiny_sd.add_noise(x0, eps, t)
    assert torch.allclose(x_t, s.add_noise(x0, eps, k), atol=1e-5)
    v = s.get_velocity(x0, eps, k)
    assert torch.allclose(tiny_sd.v_from_eps(x_t, eps, t), v, atol=1e-5)
    assert torch.allclose(tiny_sd.eps_from_v(x_t, v, t), eps, atol=1e-4)
    assert torch.allclose(tiny_sd.x0_from_v(x_t, v, t), x0, atol=1e-5)
    assert torch.allclose(tiny_sd.x0_from_eps(x_t, eps, t), x0, atol=1e-3)  # /sqrt(a) amplifies at t ~ 1
    assert torch.allclose(tiny_sd.eps_from_x0(x_t, x0, t), eps, atol=1e-4)
    # EDM view: x_t / sqrt(a) = x0 + sigma eps
    a = tiny_sd.alpha_bar(t).view(-1, 1, 1, 1)
    assert torch.allclose(x_t / a.sqrt(), x0 + tiny_sd.sigma(t).view(-1, 1, 1, 1) * eps, atol=1e-3, rtol=1e-5)
    # x0 prediction of one model output, per timestep, equals DDPMScheduler.step's pred_original_sample
    for i in range(4):
        ref = s.step(out[i:i + 1], int(k[i]), x_t[i:i + 1], generator=g).pred_original_sample
        mine = (tiny_sd.x0_from_eps(x_t[i:i + 1], out[i:i + 1], t[i]) if pred == "epsilon"
                else tiny_sd.x0_from_v(x_t[i:i + 1], out[i:i + 1], t[i]))
        assert torch.allclose(mine, ref, atol=1e-4), i


def test_training_target_is_noise_or_velocity(tiny_sd, tiny_sd_v_path):
    v_model = Denoiser.load(tiny_sd_v_path, dtype="fp32", device="cpu")
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    k = torch.tensor([100, 700])
    assert torch.equal(tiny_sd.target(x0, eps, k / 999.0), eps)
    assert torch.allclose(v_model.target(x0, eps, k / 999.0), _ddpm(v_model, "v_prediction").get_velocity(x0, eps, k),
                          atol=1e-5)


# ------------------------------------------------------------------------------------------------ UNet, CFG
def _count_calls(module):
    calls = []
    h = module.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    return calls, h


def test_cfg_is_one_batched_call_and_matches_two_calls(tiny_sd):
    e = tiny_sd.encode_prompt(["a red cube, front view", "a red cube, back view"], negative="blurry")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([0.2, 0.8])
    calls, h = _count_calls(tiny_sd.unet)
    try:
        guided = tiny_sd.predict_eps(x, t, e, 7.5)
        assert calls == [4]
        one = tiny_sd.predict_eps(x, t, e, 1.0)
        assert calls == [4, 2]
    finally:
        h.remove()
    c = tiny_sd.unet_output(x, t, e, cond=True)
    u = tiny_sd.unet_output(x, t, e, cond=False)
    assert torch.equal(one, c)
    assert torch.allclose(guided, u + 7.5 * (c - u), atol=1e-5)
    assert not torch.allclose(c, u, atol=1e-4)  # the negative prompt matters
    # the UNet really gets timestep t * 999 (float)
    ref = tiny_sd.unet(x, t * 999.0, encoder_hidden_states=e.cond).sample
    assert torch.equal(c, ref)


def test_v_prediction_predict_eps_converts(tiny_sd_v_path):
    den = Denoiser.load(tiny_sd_v_path, dtype="fp32", device="cpu")
    e = den.encode_prompt("a cube")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    v = den.unet_output(x, 0.5, e)
    assert torch.allclose(den.predict_eps(x, 0.5, e, 1.0), den.eps_from_v(x, v, 0.5), atol=1e-6)


def test_prompt_cache_and_embeds(tiny_sd):
    tiny_sd._prompt_cache.clear()
    calls, h = _count_calls(tiny_sd.text_encoder)
    try:
        a = tiny_sd.encode_prompt(["a cube, front view", "a cube, side view", "a cube, front view"])
        b = tiny_sd.encode_prompt(["a cube, front view", "a cube, side view", "a cube, front view"])
    finally:
        h.remove()
    assert len(calls) == 3  # two distinct prompts + the empty negative, each encoded once
    assert torch.equal(a.cond, b.cond) and torch.equal(a.uncond, b.uncond)
    assert a.cond.shape == (3, 77, 32) and a.uncond.shape == (3, 77, 32) and len(a) == 3
    assert torch.equal(a.cond[0], a.cond[2]) and not torch.equal(a.cond[0], a.cond[1])
    assert a.pooled_cond is None and a.time_ids_cond is None
    sub = a.index(1)
    assert len(sub) == 1 and torch.equal(sub.cond[0], a.cond[1])
    assert torch.equal(PromptEmbeds.cat([a.index(0), a.index([1, 2])]).cond, a.cond)
    with pytest.raises(DreamFlowError, match="2 prompt embeddings for 3 latents"):
        tiny_sd.predict_eps(torch.zeros(3, 4, 8, 8), 0.5, a.index([0, 1]), 7.5)


def test_refiner_embeds_and_cfg(tiny_refiner, tiny_sd):
    e = tiny_refiner.encode_prompt(["a red cube", "a blue cube"])
    assert e.cond.shape == (2, 77, 32) and e.pooled_cond.shape == (2, 32) and e.pooled_uncond.shape == (2, 32)
    assert e.time_ids_cond.shape == (2, 5) and e.time_ids_uncond.shape == (2, 5)
    assert e.time_ids_cond[0].tolist() == [16.0, 16.0, 0.0, 0.0, 6.0]
    assert e.time_ids_uncond[1].tolist() == [16.0, 16.0, 0.0, 0.0, 2.5]
    # penultimate hidden state + projected pooled output (as diffusers' SDXL pipelines)
    ids = tiny_refiner.tokenizer_2("a red cube", padding="max_length", max_length=77, return_tensors="pt").input_ids
    out = tiny_refiner.text_encoder_2(ids, output_hidden_states=True)
    assert torch.equal(e.cond[0], out.hidden_states[-2][0]) and torch.equal(e.pooled_cond[0], out.text_embeds[0])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    c, u = tiny_refiner.unet_output(x, 0.3, e, True), tiny_refiner.unet_output(x, 0.3, e, False)
    assert torch.allclose(tiny_refiner.predict_eps(x, 0.3, e, 4.0), u + 4.0 * (c - u), atol=1e-5)
    with pytest.raises(DreamFlowError, match="pooled text embeddings"):
        tiny_refiner.predict_eps(x, 0.3, tiny_sd.encode_prompt(["a", "b"]), 4.0)


# ------------------------------------------------------------------------------------------------ VAE
def test_encode_is_differentiable_and_decode_has_range(tiny_sd):
    g = torch.Generator().manual_seed(5)
    img = torch.rand(2, 3, 16, 16, generator=g, requires_grad=True)
    z = tiny_sd.encode_images(img, generator=g)
    assert z.shape == (2, 4, 8, 8) and z.dtype == torch.float32
    (z ** 2).sum().backward()
    assert img.grad is not None and torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0
    mean = tiny_sd.encode_images(img.detach(), sample=False)
    ref = tiny_sd.vae.encode(img.detach() * 2 - 1).latent_dist.mean * tiny_sd.vae.config.scaling_factor
    assert torch.allclose(mean, ref, atol=1e-6)
    assert torch.equal(mean, tiny_sd.encode_images(img.detach(), sample=False))
    x = tiny_sd.decode_latents(mean)
    assert x.shape == (2, 3, 16, 16) and x.min() >= 0 and x.max() <= 1
    ref = ((tiny_sd.vae.decode(mean / tiny_sd.vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)
    assert torch.allclose(x, ref, atol=1e-6)
    with pytest.raises(DreamFlowError, match="not a multiple"):
        tiny_sd.encode_images(torch.rand(1, 3, 15, 16))


def test_vae_dtype_auto_upcasts_only_overflowing_vaes(monkeypatch):
    """auto: the model's dtype, except a float16 model with a force_upcast VAE (SDXL): bfloat16 on a GPU with
    bfloat16 (as ComfyUI), float32 elsewhere; explicit choices win; bad names get a one-line error."""
    from dreamflow.denoisers.denoiser import resolve_vae_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    assert resolve_vae_dtype("auto", f16, False, cuda) is f16
    assert resolve_vae_dtype("auto", f32, True, cpu) is f32
    assert resolve_vae_dtype("auto", f16, True, cpu) is f32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_vae_dtype("auto", f16, True, cuda) is bf16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_vae_dtype("auto", f16, True, cuda) is f32
    assert resolve_vae_dtype("fp32", f16, False, cuda) is f32 and resolve_vae_dtype("bf16", f32, False, cpu) is bf16
    with pytest.raises(DreamFlowError, match="vae_dtype=.fp8. is unknown") as e:
        resolve_vae_dtype("fp8", f16, False, cpu)
    assert "\n" not in str(e.value)


def test_vae_checkpointing_auto_and_same_gradients(monkeypatch, tiny_sd_path):
    """auto: on for CUDA cards under 40 GiB, "large" (1024 px encodes only) on bigger ones, off on the CPU; a
    checkpointed encoder gives the same latents and image gradients as the plain one (it recomputes, it does
    not approximate)."""
    from types import SimpleNamespace

    from dreamflow.denoisers.denoiser import resolve_vae_checkpointing

    assert resolve_vae_checkpointing("auto", torch.device("cpu")) is False
    assert resolve_vae_checkpointing(True, torch.device("cpu")) is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for gib, on in ((24, True), (80, "large")):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d, g=gib: SimpleNamespace(total_memory=g * 2 ** 30))
        assert resolve_vae_checkpointing("auto", torch.device("cuda")) == on
    with pytest.raises(DreamFlowError, match="vae_checkpointing"):
        resolve_vae_checkpointing("sometimes", torch.device("cpu"))
    monkeypatch.undo()
    img = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    outs = []
    for ckpt in (False, True):
        den = Denoiser.load(tiny_sd_path, dtype="fp32", device="cpu", vae_checkpointing=ckpt)
        assert den.vae.encoder.gradient_checkpointing is ckpt
        x = img.clone().requires_grad_(True)
        z = den.encode_images(x, sample=False)
        z.square().sum().backward()
        outs.append((z.detach(), x.grad))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-6) and torch.allclose(outs[0][1], outs[1][1], atol=1e-6)
    assert outs[0][1].abs().sum() > 0
    # "large": decided per encode by the image size
    import dreamflow.denoisers.denoiser as denoiser_module

    den.vae_checkpointing = "large"
    den.encode_images(img, sample=False)
    assert den.vae.encoder.gradient_checkpointing is False
    monkeypatch.setattr(denoiser_module, "VAE_CHECKPOINTING_MIN_PX", 32)
    den.encode_images(img, sample=False)
    assert den.vae.encoder.gradient_checkpointing is True


def test_cpu_offload_and_vae_options_give_same_results(tiny_sd, tiny_sd_path):
    den = Denoiser.load(tiny_sd_path, dtype="fp32", device="cpu", cpu_offload=True, vae_slicing=True, vae_tiling=True)
    assert den.vae.use_slicing and den.vae.use_tiling
    img = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    assert torch.allclose(den.encode_images(img, sample=False), tiny_sd.encode_images(img, sample=False), atol=1e-6)
    assert torch.equal(den.encode_prompt("a cube").cond, tiny_sd.encode_prompt("a cube").cond)
    den.unload()
    assert den.unet is None and den.vae is None
