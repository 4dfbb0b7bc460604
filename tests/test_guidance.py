"""Guidance: APFO schedule and target formula, SDS / VSD baselines, one interface (tiny SD, CPU)."""

import math

import pytest
import torch

from dreamflow.errors import DreamFlowError
from dreamflow.guidance import GuidanceConfig, TimestepSchedule, make_guidance


# ---------------------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("n,k", [(1, 1), (10, 1), (10, 3), (2500, 4)])
def test_schedule_strictly_decreasing_and_hits_both_endpoints(n, k):
    s = TimestepSchedule(1.0, 0.2, n, k)
    ts = s.timesteps()
    assert ts[0].item() == 1.0 and ts[-1].item() == pytest.approx(0.2, abs=1e-12)
    assert bool((ts[1:] < ts[:-1]).all())
    assert ts.numel() == math.ceil(n / k) + 1
    # every update uses a (t_i, t_{i+1}) pair of the schedule; k consecutive updates share t_i
    pairs = [s.at(step) for step in range(n)]
    assert pairs[0] == (1.0, float(ts[1]))
    assert pairs[-1][1] == pytest.approx(0.2)
    assert all(a > b for a, b in pairs)
    assert all(pairs[i][0] >= pairs[i + 1][0] for i in range(n - 1))
    if k > 1 and n > k:
        assert pairs[0] == pairs[k - 1] and pairs[k] != pairs[0]


def test_schedule_round_trips_and_sigma_spacing(tiny_sd):
    s = TimestepSchedule(0.9, 0.1, 40, 2, spacing="sigma")
    assert TimestepSchedule.from_dict(s.to_dict()) == s
    ts = s.timesteps(tiny_sd.sigma)
    assert ts[0].item() == pytest.approx(0.9) and ts[-1].item() == pytest.approx(0.1)
    sig = tiny_sd.sigma(ts.float()).double()
    steps = sig[:-1] - sig[1:]
    assert bool((steps > 0).all())
    assert float(steps.max() / steps.min()) < 1.05  # linear in sigma


@pytest.mark.parametrize("kw", [dict(t_start=0.2, t_end=0.2), dict(t_start=0.1, t_end=0.5), dict(method="dds"),
                                dict(cfg_scale=0.5), dict(updates_per_t=0)])
def test_bad_guidance_config_is_a_one_line_error(kw):
    with pytest.raises(DreamFlowError) as e:
        GuidanceConfig(**kw).validate()
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- APFO
def _latents(tiny_sd, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = tiny_sd.native_resolution // tiny_sd.vae_scale_factor
    return torch.randn(b, tiny_sd.latent_channels, n, n, generator=g)


class _Spy:
    """Stands in for the scene LoRA: a fixed prediction, records the t of each LoRA step (train_step, or a
    begin_step / finish pair: APFO's shared forward)."""

    def __init__(self, fn, denoiser=None):
        self.fn, self.calls, self.denoiser = fn, [], denoiser

    def eps(self, x_t, t, embeds, camera):
        return self.fn(x_t, t)

    def train_step(self, x0, embeds, camera, t=None, generator=None, defer_check=False):
        self.calls.append(None if t is None else t.clone())
        return torch.tensor(0.0, device=x0.device)  # on the latents' device, as the real step's loss

    def begin_step(self, x0, embeds, camera, t=None, generator=None, noise=None):
        spy = self
        x_t = self.denoiser.add_noise(x0, noise, t)

        class Step:
            eps = spy.fn(x_t, t)

            def finish(self, defer_check=False):
                spy.calls.append(t.clone())
                return torch.tensor(0.0, device=x0.device)

        return Step()

    def state_tensors(self):
        return {}

    def remove(self):
        pass


def test_apfo_target_matches_formula(tiny_sd):
    cfg = GuidanceConfig(method="apfo", cfg_scale=3.0, t_start=0.9, t_end=0.1, updates_per_t=2)
    g = make_guidance(tiny_sd, cfg, total_updates=8, seed=3)
    g.close()
    g.scene = _Spy(lambda x_t, t: 0.25 * x_t, tiny_sd)
    x = _latents(tiny_sd).requires_grad_(True)
    embeds = tiny_sd.encode_prompt(["a red cube, front view", "a red cube, side view"])
    cam = torch.eye(4).flatten().expand(2, 16)
    step = 5
    out = g(x, embeds, cam, step)
    # recompute by hand with the same noise draw
    t_i, t_next = g.schedule.at(step)
    assert (t_i, t_next) == pytest.approx((float(g.schedule.timesteps()[2]), float(g.schedule.timesteps()[3])))
    gen = torch.Generator().manual_seed(3)
    eps = torch.randn(x.shape, generator=gen)
    t = torch.full((2,), t_i)
    x_t = tiny_sd.add_noise(x.detach(), eps, t)
    eps_pre = tiny_sd.predict_eps(x_t, t, embeds, 3.0)
    sigma_i, sigma_next = tiny_sd.sigma(t), tiny_sd.sigma(torch.full((2,), t_next))
    x_hat = x.detach() - (sigma_i - sigma_next).view(2, 1, 1, 1) * (eps_pre - 0.25 * x_t)
    torch.testing.assert_close(out.target, x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, 0.5 * (x.detach() - x_hat).pow(2).sum() / 2, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    torch.testing.assert_close(x.grad, (x.detach() - x_hat) / 2, rtol=1e-5, atol=1e-6)
    # the LoRA trained once, at the same t_i
    assert len(g.scene.calls) == 1 and torch.allclose(g.scene.calls[0], t)
    assert out.log["t"] == t_i and float(out.log["sigma"]) == pytest.approx(float(sigma_i[0]))


@pytest.mark.parametrize("spacing", ["linear", "sigma"])
def test_apfo_mean_step_scale_divides_the_step_by_the_schedules_mean_step(tiny_sd, spacing):
    """step_scale="mean": the same target direction, the step divided by (sigma(t_start) - sigma(t_end)) / n."""
    x = _latents(tiny_sd)
    embeds = tiny_sd.encode_prompt(["a red cube, front view", "a red cube, side view"])
    steps = {}
    for scale in ("ode", "mean"):
        cfg = GuidanceConfig(method="apfo", cfg_scale=3.0, t_start=0.9, t_end=0.1, updates_per_t=2, spacing=spacing,
                             step_scale=scale)
        g = make_guidance(tiny_sd, cfg, total_updates=8, seed=3)
        g.close()
        g.scene = _Spy(lambda x_t, t: 0.25 * x_t, tiny_sd)
        steps[scale] = x - g(x, embeds, None, 5).target
    unit = float(tiny_sd.sigma(torch.tensor(0.9)) - tiny_sd.sigma(torch.tensor(0.1))) / 4  # 8 updates, 2 per t
    assert unit != pytest.approx(1.0)
    torch.testing.assert_close(steps["mean"], steps["ode"] / unit, rtol=1e-5, atol=1e-6)


def test_apfo_target_is_x_when_scene_equals_pretrained(tiny_sd):
    cfg = GuidanceConfig(method="apfo", cfg_scale=5.0, t_start=0.8, t_end=0.2)
    g = make_guidance(tiny_sd, cfg, total_updates=4, seed=0)
    g.close()
    embeds = tiny_sd.encode_prompt(["a cube"] * 2)
    g.scene = _Spy(lambda x_t, t: tiny_sd.predict_eps(x_t, t, embeds, 5.0), tiny_sd)
    x = _latents(tiny_sd)
    out = g(x, embeds, None, 0)
    torch.testing.assert_close(out.target, x, rtol=0, atol=1e-6)
    assert float(out.loss) == pytest.approx(0.0, abs=1e-10)


def test_apfo_with_real_scene_lora_is_deterministic_and_restores_unet(tiny_sd):
    before = {k: v.clone() for k, v in tiny_sd.unet.state_dict().items()}
    cfg = GuidanceConfig(method="apfo", t_start=1.0, t_end=0.2)
    embeds = tiny_sd.encode_prompt(["a red cube, front view"] * 2)
    cam = torch.eye(4).flatten().expand(2, 16)
    runs = []
    for _ in range(2):
        g = make_guidance(tiny_sd, cfg, total_updates=3, seed=11)
        outs = [g(_latents(tiny_sd), embeds, cam, s) for s in range(3)]
        runs.append(torch.stack([o.target for o in outs]))
        assert all(o.log["lora_loss"] is not None and math.isfinite(float(o.log["lora_loss"])) for o in outs)
        g.close()
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    after = tiny_sd.unet.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)


def _count_unet_calls(denoiser):
    calls = []
    handle = denoiser.unet.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    return calls, handle


@pytest.mark.parametrize("shares", [True, False])
def test_apfo_shared_lora_forward_reads_eps_phi_before_the_step(tiny_sd, shares):
    """lora_shares_noise: eps_scene is the LoRA's prediction at the target's x_t *before* this update's LoRA step,
    the LoRA's loss is ||eps_phi(x_t) - eps||^2 at that same x_t, the step then changes the LoRA, and the update
    runs 2 UNet calls (CFG + one scene forward) instead of 3. Without sharing: 3 calls, the same target."""
    cfg = GuidanceConfig(method="apfo", t_start=0.9, t_end=0.2, lora_shares_noise=shares)
    cfg.lora.camera_dropout = 0.0
    cfg.lora.lr = 1e-2  # the LoRA moves visibly in 3 steps
    embeds = tiny_sd.encode_prompt(["a red cube, front view"] * 2)
    cam = torch.eye(4).flatten().expand(2, 16).clone()
    g = make_guidance(tiny_sd, cfg, total_updates=8, seed=4)
    try:
        for s in range(3):  # B matrices leave zero: eps_phi differs from the pretrained model
            g(_latents(tiny_sd, seed=s), embeds, cam, s)
        x = _latents(tiny_sd, seed=9)
        before = {k: v.clone() for k, v in g.scene.state_tensors().items()}
        gen_state = g.generator.get_state()
        calls, handle = _count_unet_calls(tiny_sd)
        try:
            out = g(x, embeds, cam, 3)
        finally:
            handle.remove()
        after = g.scene.state_tensors()
        assert any(not torch.equal(before[k], after[k]) for k in before)  # the LoRA stepped
        # replay the draw against the LoRA as it was before the step
        g.scene.load_state_tensors(before)
        gen = torch.Generator().manual_seed(0)
        gen.set_state(gen_state)
        eps = torch.randn(x.shape, generator=gen)
        t_i, t_next = g.schedule.at(3)
        t = torch.full((2,), t_i)
        x_t = tiny_sd.add_noise(x, eps, t)
        with torch.no_grad():
            eps_phi = g.scene.eps(x_t, t, embeds, cam).float()
            eps_pre = tiny_sd.predict_eps(x_t, t, embeds, cfg.cfg_scale)
        assert not torch.allclose(eps_phi, tiny_sd.predict_eps(x_t, t, embeds, 1.0), atol=1e-4)
        delta = (tiny_sd.sigma(t) - tiny_sd.sigma(torch.full((2,), t_next))).view(2, 1, 1, 1)
        torch.testing.assert_close(out.target, x - delta * (eps_pre - eps_phi), rtol=1e-5, atol=1e-5)
        if shares:
            assert float(out.log["lora_loss"]) == pytest.approx(float((eps_phi - eps).pow(2).mean()), rel=1e-5)
        assert sorted(calls) == ([2, 4] if shares else [2, 2, 4])  # CFG batch 2B, scene forward(s) B
    finally:
        g.close()


def test_apfo_shared_forward_is_joined_before_the_cfg_call(tiny_sd, monkeypatch):
    """With lora_shares_noise the main stream takes eps_phi (waiting for the LoRA stream's forward) before the
    pretrained CFG call is queued: the LoRA's forward graph and the CFG graph never replay side by side (doing so
    hung an H100; graphs captured on one capture stream share cuBLAS's workspace)."""
    order = []
    g = make_guidance(tiny_sd, GuidanceConfig(method="apfo", lora_shares_noise=True), total_updates=2, seed=0)
    try:
        take, predict = g.scene_model._take, tiny_sd.predict_eps
        monkeypatch.setattr(g.scene_model, "_take", lambda step: (order.append("join lora forward"), take(step))[1])
        monkeypatch.setattr(tiny_sd, "predict_eps", lambda *a, **k: (order.append("cfg"), predict(*a, **k))[1])
        g(_latents(tiny_sd), tiny_sd.encode_prompt(["a cube"] * 2), torch.eye(4).flatten().expand(2, 16), 0)
    finally:
        g.close()
    assert order == ["join lora forward", "cfg"]


# ---------------------------------------------------------------------------------------------- SDS / VSD
def test_sds_gradient_is_weighted_noise_residual(tiny_sd):
    cfg = GuidanceConfig(method="sds", cfg_scale=7.5, t_start=0.98, t_end=0.02)
    g = make_guidance(tiny_sd, cfg, total_updates=10, seed=5)
    assert g.scene is None
    x = _latents(tiny_sd)
    embeds = tiny_sd.encode_prompt(["a cube"] * 2)
    out = g(x, embeds, None, 0)
    gen = torch.Generator().manual_seed(5)
    t = 0.02 + 0.96 * torch.rand(2, generator=gen)
    eps = torch.randn(x.shape, generator=gen)
    x_t = tiny_sd.add_noise(x, eps, t)
    grad = (1 - tiny_sd.alpha_bar(t)).view(2, 1, 1, 1) * (tiny_sd.predict_eps(x_t, t, embeds, 7.5) - eps)
    torch.testing.assert_close(out.target, x - grad, rtol=1e-5, atol=1e-5)
    assert 0.02 <= float(out.log["t"]) <= 0.98


def test_vsd_uses_scene_prediction_and_random_t(tiny_sd):
    cfg = GuidanceConfig(method="vsd", cfg_scale=7.5, t_start=0.98, t_end=0.02, weighting="uniform")
    g = make_guidance(tiny_sd, cfg, total_updates=10, seed=2)
    g.close()
    g.scene = _Spy(lambda x_t, t: 0.5 * x_t)
    x = _latents(tiny_sd)
    embeds = tiny_sd.encode_prompt(["a cube"] * 2)
    out = g(x, embeds, None, 0)
    gen = torch.Generator().manual_seed(2)
    t = 0.02 + 0.96 * torch.rand(2, generator=gen)
    eps = torch.randn(x.shape, generator=gen)
    x_t = tiny_sd.add_noise(x, eps, t)
    grad = tiny_sd.predict_eps(x_t, t, embeds, 7.5) - 0.5 * x_t
    torch.testing.assert_close(out.target, x - grad, rtol=1e-5, atol=1e-5)
    assert g.scene.calls == [None]  # VSD trains its LoRA at its own random t


@pytest.mark.parametrize("method", ["apfo", "sds", "vsd"])
def test_every_method_returns_the_same_log_fields(tiny_sd, method):
    g = make_guidance(tiny_sd, GuidanceConfig(method=method), total_updates=2, seed=0)
    try:
        out = g(_latents(tiny_sd, b=1), tiny_sd.encode_prompt(["a cube, front view"]), torch.eye(4).flatten()[None], 0)
    finally:
        g.close()
    assert out.loss.dim() == 0 and math.isfinite(float(out.loss))
    assert {"t", "sigma", "grad_norm"} <= set(out.log)
    assert float(out.log["grad_norm"]) > 0


# ---------------------------------------------------------------------------------------------- registry
def test_registry_holds_the_three_methods_in_dropdown_order():
    from dreamflow.guidance import METHODS, REGISTRY
    from dreamflow.guidance.apfo import APFOGuidance
    from dreamflow.guidance.sds import SDSGuidance
    from dreamflow.guidance.vsd import VSDGuidance

    assert METHODS == ("apfo", "sds", "vsd")  # DreamFlow first: the nodes' dropdown order
    assert REGISTRY == {"apfo": APFOGuidance, "sds": SDSGuidance, "vsd": VSDGuidance}


def test_a_new_method_is_one_registered_class(tiny_sd):
    """What a new method's file does: subclass Guidance and register it; config, factory and list follow."""
    from dreamflow.guidance import REGISTRY, Guidance, GuidanceOutput, methods, register

    @register
    class Zero(Guidance):
        name = "zero-test"

        def __call__(self, latents, embeds, camera, step):
            x = latents.float()
            return GuidanceOutput(loss=self.target_loss(x, x), target=x.detach(), log={"t": 0.0})

    try:
        assert "zero-test" in methods()
        g = make_guidance(tiny_sd, GuidanceConfig(method="zero-test"), total_updates=1)
        assert isinstance(g, Zero) and g.scene is None
        assert float(g(_latents(tiny_sd, b=1), None, None, 0).loss) == 0.0
        with pytest.raises(DreamFlowError, match="registered twice"):
            register(type("Other", (Guidance,), {"name": "zero-test"}))
    finally:
        REGISTRY.pop("zero-test")
    with pytest.raises(DreamFlowError, match="unknown; use one of: apfo, sds, vsd"):
        GuidanceConfig(method="zero-test").validate()
