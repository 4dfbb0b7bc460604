"""Scene LoRA (VSD's eps_phi): exact pretrained path, no-op at init, training, state round trip, clean removal.

Each test loads its own tiny denoiser (a few ms) so that no LoRA leaks into the session-wide ``tiny_sd``.
"Exact" comparisons use torch.equal: with the adapter off (or B = 0 and a zero camera MLP) the forward pass
performs the same float operations as the frozen UNet (adding an exact 0 changes no bit).
"""

from __future__ import annotations

import pytest
import torch

from dreamflow.denoisers import Denoiser, SceneDenoiser, SceneLoRAConfig
from dreamflow.errors import DreamFlowError
from dreamflow.io import load_state_file, save_state_file

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture
def den(tiny_sd_path):
    return Denoiser.load(tiny_sd_path, dtype="fp32", device="cpu")


def _batch(den, seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, 8, 8, generator=g)
    cam = torch.randn(b, 16, generator=g)
    return x, cam, den.encode_prompt(["a red cube, front view", "a red cube, side view"][:b])


def _train(scene, den, n, seed=0, lr_batch_seed=7):
    x0, cam, e = _batch(den, lr_batch_seed)
    g = torch.Generator()
    losses = []
    for _ in range(n):
        g.manual_seed(seed)  # the same t, noise and dropout coin every step: a fixed batch
        losses.append(scene.train_step(x0, e, cam, t=torch.tensor([0.3, 0.6]), generator=g))
    return losses


def test_adapter_off_is_the_frozen_unet_exactly(den):
    x, cam, e = _batch(den)
    t = torch.tensor([0.25, 0.75])
    before = den.predict_eps(x, t, e, 7.5)
    before_u = den.unet_output(x, t, e, cond=False)
    scene = SceneDenoiser(den, SceneLoRAConfig(lr=1e-2))
    assert torch.equal(den.predict_eps(x, t, e, 7.5), before)
    _train(scene, den, 3)  # LoRA and camera MLP are now non-zero
    assert any(p.abs().sum() > 0 for n, p in den.unet.named_parameters() if "lora_B" in n)
    assert torch.equal(den.predict_eps(x, t, e, 7.5), before)
    assert torch.equal(den.unet_output(x, t, e, cond=False), before_u)
    with scene.adapter(True):
        assert not torch.equal(den.predict_eps(x, t, e, 7.5), before)
    assert torch.equal(den.predict_eps(x, t, e, 7.5), before)
    assert len(den.unet.time_embedding._forward_hooks) == 0  # the camera hook exists only inside scene calls
    scene.remove()


def test_scene_model_equals_pretrained_at_init(den):
    x, cam, e = _batch(den, 1)
    scene = SceneDenoiser(den)
    assert all(torch.count_nonzero(p) == 0 for n, p in den.unet.named_parameters() if "lora_B" in n)
    assert torch.count_nonzero(scene.camera_mlp[2].weight) == 0
    lora = [p for n, p in den.unet.named_parameters() if "lora_" in n]
    # rank 4 on to_q/k/v/out of every attention: 2 blocks x (attn1 + attn2) x 4 projections x (A + B)
    assert len(lora) == 4 * 2 * 4 * 2 and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    assert {p.shape[0] for n, p in den.unet.named_parameters() if "lora_A" in n} == {4}
    for t in (0.1, 0.5, 0.9):
        assert torch.equal(scene.eps(x, t, e, cam), den.predict_eps(x, t, e, 1.0))
    assert torch.equal(scene.eps(x, 0.5, e, None), den.predict_eps(x, 0.5, e, 1.0))
    scene.remove()


def test_train_step_lowers_loss_on_a_fixed_batch(den):
    scene = SceneDenoiser(den, SceneLoRAConfig(lr=1e-3, camera_dropout=0.0), seed=3)
    losses = _train(scene, den, 20)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.95 * losses[0]
    assert scene.steps == 20
    # the camera now matters for the scene model, and only for it
    x, cam, e = _batch(den, 2)
    assert not torch.allclose(scene.eps(x, 0.5, e, cam), scene.eps(x, 0.5, e, -cam))
    scene.remove()


def _v_loss_twin(den):
    """A batch and the brute-force diffusion loss of the pretrained v-prediction model on it, at t = 0.2, 0.9:
    (x0, camera, embeds, t, noise, loss) with loss = mse(unet(x_t, t), v), v = sqrt(a) eps - sqrt(1-a) x0."""
    x0, cam, e = _batch(den, 4)
    t = torch.tensor([0.2, 0.9])
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    a = den.alpha_bar(t).view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    v = a.sqrt() * noise - (1 - a).sqrt() * x0
    return x0, cam, e, t, noise, torch.nn.functional.mse_loss(den.unet_output(x_t, t, e), v)


def test_first_loss_is_the_diffusion_loss_of_the_pretrained_model(tiny_sd_v_path):
    """Brute-force twin of train_step's loss (v-prediction model: the target is v = sqrt(a) eps - sqrt(1-a) x0)."""
    den = Denoiser.load(tiny_sd_v_path, dtype="fp32", device="cpu")
    scene = SceneDenoiser(den, SceneLoRAConfig(camera_dropout=0.0))
    x0, cam, e, t, noise, ref = _v_loss_twin(den)
    assert scene.train_step(x0, e, cam, t=t, noise=noise) == pytest.approx(ref.item(), rel=1e-5)
    scene.remove()


def test_remove_restores_the_unet_exactly(den):
    from peft.tuners.tuners_utils import BaseTunerLayer

    original = {k: v.clone() for k, v in den.unet.state_dict().items()}
    modules = [type(m).__name__ for m in den.unet.modules()]
    scene = SceneDenoiser(den, SceneLoRAConfig(lr=1e-2))
    assert any(isinstance(m, BaseTunerLayer) for m in den.unet.modules())
    _train(scene, den, 2)
    scene.remove()
    after = den.unet.state_dict()
    assert list(after) == list(original)
    assert all(torch.equal(after[k], original[k]) for k in original)
    assert [type(m).__name__ for m in den.unet.modules()] == modules
    assert not any(p.requires_grad for p in den.unet.parameters())
    assert len(den.unet.time_embedding._forward_hooks) == 0
    with pytest.raises(DreamFlowError, match="removed"):
        scene.eps(*_batch(den)[:1], 0.5, _batch(den)[2], None)
    # a new scene model can be attached afterwards
    SceneDenoiser(den).remove()


def test_state_tensors_round_trip_through_a_file(den, tiny_sd_path, tmp_path):
    scene = SceneDenoiser(den, SceneLoRAConfig(lr=1e-2), seed=1)
    _train(scene, den, 3)
    state = scene.state_tensors()
    assert any(k.startswith("lora.") for k in state) and any(k.startswith("camera_mlp.") for k in state)
    path = save_state_file(str(tmp_path / "scene.safetensors"), state, {"format": "scene_lora", "version": 1})
    loaded, _ = load_state_file(path, "scene_lora", 1)
    x, cam, e = _batch(den, 9)
    want = scene.eps(x, 0.4, e, cam)

    other = Denoiser.load(tiny_sd_path, dtype="fp32", device="cpu")
    fresh = SceneDenoiser(other, seed=5)
    e2 = other.encode_prompt(["a red cube, front view", "a red cube, side view"])
    assert not torch.equal(fresh.eps(x, 0.4, e2, cam), want)
    fresh.load_state_tensors(loaded)
    assert torch.equal(fresh.eps(x, 0.4, e2, cam), want)
    assert all(torch.equal(fresh.state_tensors()[k], state[k]) for k in state)

    wrong = SceneDenoiser(Denoiser.load(tiny_sd_path, dtype="fp32", device="cpu"), SceneLoRAConfig(rank=2))
    with pytest.raises(DreamFlowError, match="does not match"):
        wrong.load_state_tensors(loaded)
    for s in (scene, fresh, wrong):
        s.remove()


def test_refiner_scene_lora_and_config_errors(tiny_refiner_path):
    den = Denoiser.load(tiny_refiner_path, dtype="fp32", device="cpu")
    e = den.encode_prompt(["a cube"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    scene = SceneDenoiser(den)
    assert torch.equal(scene.eps(x, 0.5, e, torch.eye(4).flatten()[None]), den.predict_eps(x, 0.5, e, 1.0))
    with pytest.raises(DreamFlowError, match="camera condition must be"):
        scene.eps(x, 0.5, e, torch.zeros(1, 12))
    with pytest.raises(DreamFlowError, match="already carries a scene LoRA"):
        SceneDenoiser(den)
    scene.remove()
    with pytest.raises(DreamFlowError, match="rank 0"):
        SceneDenoiser(den, SceneLoRAConfig(rank=0))
    with pytest.raises(DreamFlowError, match="t_range"):
        SceneLoRAConfig(t_range=(0.5, 0.2)).validate()


def test_failed_adapter_leaves_the_unet_usable(tiny_sd):
    from dreamflow.denoisers import SceneDenoiser, SceneLoRAConfig
    from dreamflow.errors import DreamFlowError

    with pytest.raises(DreamFlowError, match="target_modules"):
        SceneDenoiser(tiny_sd, SceneLoRAConfig(target_modules=("no_such_layer",)))
    scene = SceneDenoiser(tiny_sd)  # a later, valid LoRA still goes on
    scene.remove()


# ---------------------------------------------------------------- host syncs (issue 6)
def test_train_step_returns_the_loss_as_a_detached_tensor(tiny_sd_v_path):
    """The loss comes back as a 0-dim float32 tensor (no host sync) whose value is the diffusion loss the
    float-returning step gave: the same float ops as the brute-force twin, so equal to the last bit."""
    den = Denoiser.load(tiny_sd_v_path, dtype="fp32", device="cpu")
    scene = SceneDenoiser(den, SceneLoRAConfig(camera_dropout=0.0))
    x0, cam, e, t, noise, ref = _v_loss_twin(den)
    loss = scene.train_step(x0, e, cam, t=t, noise=noise)
    assert torch.is_tensor(loss) and loss.ndim == 0 and loss.dtype == torch.float32
    assert not loss.requires_grad and loss.grad_fn is None
    assert float(loss) == float(ref)
    scene.remove()


def test_non_finite_loss_raises_and_leaves_the_lora_untouched(den):
    """A NaN batch: DivergenceError, no optimiser step (weights, Adam moments, step count unchanged), no
    gradient left behind; a finite batch afterwards trains as before."""
    from dreamflow.errors import DivergenceError

    scene = SceneDenoiser(den, SceneLoRAConfig(lr=1e-2), seed=2)
    _train(scene, den, 2)  # non-zero LoRA and Adam state
    before = {k: v.clone() for k, v in scene.state_tensors().items()}
    moments = {id(p): {k: v.clone() for k, v in st.items()} for p, st in scene.optimizer.state.items()}
    x0, cam, e = _batch(den, 7)
    bad = x0.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(DivergenceError, match="scene LoRA loss is nan at LoRA step 2"):
        scene.train_step(bad, e, cam, t=torch.tensor([0.3, 0.6]), generator=torch.Generator().manual_seed(0))
    after = scene.state_tensors()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert all(p.grad is None for p in scene.parameters_to_train())
    for p, st in scene.optimizer.state.items():
        assert all(torch.equal(v, moments[id(p)][k]) for k, v in st.items())
    assert scene.steps == 2
    loss = scene.train_step(x0, e, cam, t=torch.tensor([0.3, 0.6]), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and scene.steps == 3
    assert any(not torch.equal(v, before[k]) for k, v in scene.state_tensors().items())
    scene.remove()


def test_deferred_check_skips_the_step_on_the_device_and_the_guidance_check_raises(den):
    """defer_check with a fused AdamW (the fast path's): no exception and no host sync in train_step; a NaN
    batch leaves weights and Adam moments untouched (found_inf); Guidance.check_finite raises the LoRA's error.
    Without a fused optimiser, defer_check still checks in train_step."""
    from dreamflow.errors import DivergenceError
    from dreamflow.guidance import GuidanceConfig, make_guidance

    guidance = make_guidance(den, GuidanceConfig(method="apfo"), total_updates=4, seed=2)
    scene = guidance.scene
    scene.optimizer = torch.optim.AdamW(scene.parameters_to_train(), lr=1e-2, fused=True)
    _train(scene, den, 2)
    before = {k: v.clone() for k, v in scene.state_tensors().items()}
    moments = {id(p): {k: v.clone() for k, v in st.items()} for p, st in scene.optimizer.state.items()}
    x0, cam, e = _batch(den, 7)
    bad = x0.clone()
    bad[0, 0, 0, 0] = float("nan")
    loss = scene.train_step(bad, e, cam, t=torch.tensor([0.3, 0.6]), generator=torch.Generator().manual_seed(0),
                            defer_check=True)
    assert not torch.isfinite(loss)
    assert all(torch.equal(v, before[k]) for k, v in scene.state_tensors().items())
    for p, st in scene.optimizer.state.items():
        assert all(torch.equal(v, moments[id(p)][k]) for k, v in st.items())
    with pytest.raises(DivergenceError, match="scene LoRA loss is nan at LoRA step 2;"):
        guidance.check_finite(torch.tensor(1.0), {"lora_loss": loss})
    with pytest.raises(DivergenceError, match="non-finite loss"):
        guidance.check_finite(torch.tensor(float("inf")), {"lora_loss": torch.tensor(0.5)})
    guidance.check_finite(torch.tensor(1.0), {"lora_loss": torch.tensor(0.5)})  # finite: no error
    # a finite batch trains again
    loss = scene.train_step(x0, e, cam, t=torch.tensor([0.3, 0.6]), generator=torch.Generator().manual_seed(0),
                            defer_check=True)
    assert torch.isfinite(loss) and any(not torch.equal(v, before[k]) for k, v in scene.state_tensors().items())
    # not fused: the check stays in train_step
    scene.optimizer = torch.optim.AdamW(scene.parameters_to_train(), lr=1e-2)
    with pytest.raises(DivergenceError, match="scene LoRA loss is nan"):
        scene.train_step(bad, e, cam, t=torch.tensor([0.3, 0.6]), defer_check=True)
    guidance.close()


def test_camera_dropout_is_decided_on_the_device_at_the_configured_rate(den):
    """The coin is the generator's draw after t and the noise; the camera the scene model sees is all zeros
    exactly when that coin is below camera_dropout (checked step by step against a twin generator), and
    over 160 steps the rate is the configured 0.3 within 3 binomial standard deviations."""
    p, n = 0.3, 160
    scene = SceneDenoiser(den, SceneLoRAConfig(lr=1e-4, camera_dropout=p), seed=1)
    x0, cam, e = _batch(den, 3)
    seen = []
    eager = scene.output

    def spy(x_t, t, embeds, camera):
        seen.append(bool((camera == 0).all()))
        return eager(x_t, t, embeds, camera)

    scene.output = spy
    g, twin = torch.Generator().manual_seed(123), torch.Generator().manual_seed(123)
    expected = []
    for _ in range(n):
        scene.train_step(x0, e, cam, generator=g)
        torch.rand(2, generator=twin)  # t
        torch.randn(x0.shape, generator=twin)  # noise
        expected.append(bool(torch.rand((), generator=twin) < p))
    assert seen == expected
    sd = (n * p * (1 - p)) ** 0.5
    assert abs(sum(seen) - n * p) <= 3 * sd, sum(seen)
    assert 0 < sum(seen) < n
    del scene.output
    scene.remove()


def test_scene_model_door_eps_and_step_equal_the_network_calls(den):
    """SceneModel (what guidance uses): eps() is the network's prediction in float32; eps(share=...) is the first
    LoRA step's forward at those noisy latents, which the next step() finishes as its first step; close() leaves
    the UNet as loaded. Eager here (CPU); the CUDA twins are in test_fast_path.py."""
    from dreamflow.denoisers.scene_model import SceneModel

    model = SceneModel(den, SceneLoRAConfig(lr=1e-2, camera_dropout=0.0), seed=1)
    try:
        x, cam, e = _batch(den, 3)
        t = torch.tensor([0.4, 0.7])
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
        x_t = den.add_noise(x, noise, t)
        with torch.no_grad():
            ref = model.net.eps(x_t, t, e, cam).float()
        assert torch.equal(model.eps(x_t, t, e, cam), ref)
        shared = model.eps(x_t, t, e, cam, share=(x, noise, torch.Generator().manual_seed(5)))
        torch.testing.assert_close(shared, ref, rtol=0, atol=1e-6)  # same weights, same x_t: same prediction
        before = {k: v.clone() for k, v in model.net.state_tensors().items()}
        loss = model.step(x, e, cam, t, torch.Generator().manual_seed(6), steps=2)
        assert loss.dim() == 0 and torch.isfinite(loss) and model.net.steps == 2 and model._begun is None
        assert any(not torch.equal(v, before[k]) for k, v in model.state_tensors().items())
        assert model.step(x, e, cam, t, torch.Generator(), steps=0) is None and model.net.steps == 2
    finally:
        model.close()
    assert model.net is None and not getattr(den.unet, "peft_config", None)
