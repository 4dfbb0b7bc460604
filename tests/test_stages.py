"""Stages end to end on tiny models (CPU): NeRFStage, ExtractMesh, MeshStage, SDXLRefine; states; safety."""

import numpy as np
import pytest
import torch

from dreamflow.errors import DivergenceError, DreamFlowError, DreamFlowInterrupted
from dreamflow.guidance import GuidanceConfig
from dreamflow.hosting import Callbacks
from dreamflow.render.shading import ShadingConfig
from dreamflow.render.volume import VolumeRenderConfig
from dreamflow.scene.hashgrid import HashGridConfig
from dreamflow.scene.nerf import NeRFFieldConfig
from dreamflow.stages import (ExtractConfig, MeshStageConfig, NeRFStageConfig, RefineConfig, extract_mesh_state,
                              run_mesh_stage, run_nerf_stage, run_refine_stage)
from dreamflow.state import MeshState, NeRFState

PROMPT = "A corgi standing up drinking boba."


def nerf_cfg(**kw):
    base = dict(iterations=3, views_per_update=2, resolution=24, denoise_resolution=16,
                nerf=NeRFFieldConfig(grid=HashGridConfig(n_levels=4, log2_hashmap_size=10, base_resolution=8)),
                render=VolumeRenderConfig(n_samples=12, n_importance=4))
    base.update(kw)
    return NeRFStageConfig(**base)


def mesh_cfg(cls=MeshStageConfig, **kw):
    base = dict(iterations=2, views_per_update=2, resolution=24, denoise_resolution=16)
    base.update(kw)
    return cls(**base)


@pytest.fixture(scope="module")
def nerf_state(tiny_sd):
    return run_nerf_stage(tiny_sd, PROMPT, "blurry", nerf_cfg())


@pytest.fixture(scope="module")
def mesh_state(nerf_state):
    return extract_mesh_state(nerf_state, ExtractConfig(resolution=32))


def _tensors(state):
    return {**{"f." + k: v for k, v in state.field.state_dict().items()},
            **{"b." + k: v for k, v in state.background.state_dict().items()}}


# ---------------------------------------------------------------------------------------------- NeRF stage
def test_nerf_stage_moves_parameters_and_logs_finite_losses(tiny_sd, nerf_state):
    from dreamflow.scene.nerf import NeRFField
    from dreamflow.seeding import seeded

    with seeded(0):
        init = NeRFField(nerf_cfg().nerf)
    changed = [k for k, v in init.state_dict().items() if not torch.equal(v, nerf_state.field.state_dict()[k])]
    assert "encoding.params" in changed or any("encoding" in k for k in changed)
    assert any("network" in k for k in changed)
    log = nerf_state.guidance_log
    assert [r["step"] for r in log] == [0, 1, 2]
    assert all(r["stage"] == "NeRFStage" and torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert all(r["t"] == 1.0 and r["t_next"] == pytest.approx(0.2) for r in log)  # 3 updates, 4 per t: one level
    assert nerf_state.history == ["NeRFStage"] and nerf_state.prompt == PROMPT
    assert nerf_state.lora, "the scene LoRA is kept for resuming"


def test_nerf_state_save_load_round_trip_is_exact(nerf_state, tmp_path):
    path = str(tmp_path / "n.safetensors")
    nerf_state.save(path)
    back = NeRFState.load(path)
    a, b = _tensors(nerf_state), _tensors(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k]) for k in a)
    assert back.settings == nerf_state.settings and back.guidance_log == nerf_state.guidance_log
    assert back.prompt == PROMPT and back.negative_prompt == "blurry"
    assert back.lora.keys() == nerf_state.lora.keys()
    with pytest.raises(DreamFlowError, match="mesh"):
        MeshState.load(path)  # a state from another stage


def test_same_seed_gives_identical_nerf_and_mesh(tiny_sd, nerf_state):
    again = run_nerf_stage(tiny_sd, PROMPT, "blurry", nerf_cfg())
    a, b = _tensors(nerf_state), _tensors(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    m1 = extract_mesh_state(nerf_state, ExtractConfig(resolution=32))
    m2 = extract_mesh_state(again, ExtractConfig(resolution=32))
    assert torch.equal(m1.vertices, m2.vertices) and torch.equal(m1.faces, m2.faces)
    other = run_nerf_stage(tiny_sd, PROMPT, "blurry", nerf_cfg(seed=1))
    assert not torch.equal(other.field.encoding.params, nerf_state.field.encoding.params)


def test_opaque_loss_enters_the_nerf_update(tiny_sd, nerf_state):
    """lambda_opaque (off by default) adds the opacity-entropy loss to the update: the same seed with it on moves the
    field elsewhere, and with it 0 the run is the default one bit for bit; a negative weight is refused."""
    off = run_nerf_stage(tiny_sd, PROMPT, "blurry", nerf_cfg(lambda_opaque=0.0))
    assert torch.equal(off.field.encoding.params, nerf_state.field.encoding.params)
    on = run_nerf_stage(tiny_sd, PROMPT, "blurry", nerf_cfg(lambda_opaque=100.0))
    assert not torch.equal(on.field.encoding.params, nerf_state.field.encoding.params)
    assert on.settings["lambda_opaque"] == 100.0
    with pytest.raises(DreamFlowError, match="lambda_opaque=-1.0 must be >= 0"):
        nerf_cfg(lambda_opaque=-1.0).validate()


@pytest.mark.parametrize("method", ["sds", "vsd"])
def test_baselines_run_behind_the_same_interface(tiny_sd, method):
    g = GuidanceConfig(method=method, t_start=0.98, t_end=0.02)
    s = run_nerf_stage(tiny_sd, PROMPT, "", nerf_cfg(iterations=2, guidance=g))
    assert len(s.guidance_log) == 2 and all(0.02 <= r["t"] <= 0.98 for r in s.guidance_log)
    assert bool(s.lora) == (method == "vsd")


@pytest.mark.parametrize("shares", [True, False])
def test_nerf_stage_with_and_without_the_shared_lora_forward(tiny_sd, nerf_state, shares):
    """GuidanceConfig.lora_shares_noise (default True) and its alternative (fresh LoRA noise and a second
    scene-model forward) through the whole stage loop: finite losses, a trained LoRA, the same result twice, the
    default's result exactly when True and a different one when False, and the setting kept in the state."""
    assert GuidanceConfig().lora_shares_noise is True and nerf_state.settings["guidance"]["lora_shares_noise"] is True
    g = GuidanceConfig(method="apfo", t_start=1.0, t_end=0.2, lora_shares_noise=shares)
    runs = [run_nerf_stage(tiny_sd, PROMPT, "blurry", nerf_cfg(guidance=g)) for _ in range(2)]
    a, b = _tensors(runs[0]), _tensors(runs[1])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.isfinite(torch.tensor([r["loss"], r["lora_loss"]])).all() for r in runs[0].guidance_log)
    assert any(v.abs().sum() > 0 for k, v in runs[0].lora.items() if "lora_B" in k)
    same_as_default = torch.equal(runs[0].field.encoding.params, nerf_state.field.encoding.params)
    assert same_as_default == shares
    assert runs[0].settings["guidance"]["lora_shares_noise"] is shares


def test_resume_continues_from_init(tiny_sd, nerf_state):
    more = run_nerf_stage(tiny_sd, PROMPT, "blurry", nerf_cfg(iterations=1), init=nerf_state)
    assert more.history == ["NeRFStage", "NeRFStage"] and len(more.guidance_log) == 4
    assert not torch.equal(more.field.encoding.params, nerf_state.field.encoding.params)


# ---------------------------------------------------------------------------------------------- safety
def test_interrupt_stops_within_one_update(tiny_sd):
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(DreamFlowInterrupted, match="update 2/"):
        run_nerf_stage(tiny_sd, PROMPT, "", nerf_cfg(iterations=50), callbacks=Callbacks(should_stop=stop))
    assert len(calls) == 3


def test_non_finite_loss_stops_with_step_and_last_good_state(tiny_sd, monkeypatch):
    from dreamflow.guidance import apfo

    real = apfo.APFOGuidance.__call__

    def poisoned(self, latents, embeds, camera, step):
        out = real(self, latents, embeds, camera, step)
        if step == 1:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(apfo.APFOGuidance, "__call__", poisoned)
    with pytest.raises(DivergenceError) as e:
        run_nerf_stage(tiny_sd, PROMPT, "", nerf_cfg(iterations=5))
    assert e.value.step == 1 and "update 1" in str(e.value)
    good = e.value.last_good
    assert isinstance(good, NeRFState) and len(good.guidance_log) == 1
    assert all(torch.isfinite(v).all() for v in good.field.state_dict().values())


@pytest.mark.parametrize("change,match", [
    (dict(iterations=0), "iterations"),
    (dict(guidance=GuidanceConfig(t_start=0.2, t_end=0.5)), "t_start"),
    (dict(guidance=GuidanceConfig(method="magic")), "unknown"),
    (dict(denoise_resolution=18), "not a multiple of 4"),
    (dict(views_per_update=0), "views_per_update"),
])
def test_bad_settings_are_refused_before_work(tiny_sd, change, match):
    with pytest.raises(DreamFlowError, match=match) as e:
        run_nerf_stage(tiny_sd, PROMPT, "", nerf_cfg(**change), callbacks=Callbacks(should_stop=_never_called))
    assert "\n" not in str(e.value)


def _never_called():
    raise AssertionError("work started before the settings were checked")


def test_empty_prompt_and_wrong_denoiser_kind_are_refused(tiny_sd, tiny_refiner, nerf_state):
    with pytest.raises(DreamFlowError, match="prompt is empty"):
        run_nerf_stage(tiny_sd, "  ", "", nerf_cfg())
    with pytest.raises(DreamFlowError, match="refiner|sdxl"):
        run_nerf_stage(tiny_refiner, PROMPT, "", nerf_cfg())
    with pytest.raises(DreamFlowError, match="mesh state"):
        run_mesh_stage(tiny_sd, nerf_state, PROMPT, "", mesh_cfg())


# ---------------------------------------------------------------------------------------------- mesh stages
def test_extract_gives_mesh_state_with_nerf_colours(nerf_state, mesh_state):
    assert mesh_state.vertices.shape[1] == 3 and mesh_state.faces.shape[1] == 3 and len(mesh_state.faces) > 10
    assert mesh_state.history == ["NeRFStage", "ExtractMesh"]
    assert torch.equal(mesh_state.field.encoding.params, nerf_state.field.encoding.params)
    assert mesh_state.field is not nerf_state.field


def test_mesh_stage_changes_geometry_and_colour(tiny_sd, mesh_state, tmp_path):
    before = mesh_state.field.encoding.params.clone()
    out = run_mesh_stage(tiny_sd, mesh_state, PROMPT, "", mesh_cfg())
    assert out.faces.shape == mesh_state.faces.shape and torch.equal(out.faces, mesh_state.faces)
    moved = (out.vertices - mesh_state.vertices).abs()
    assert float(moved.max()) > 0 and float(moved.max()) <= MeshStageConfig().mesh.max_offset + 1e-6
    assert not torch.equal(out.field.encoding.params, mesh_state.field.encoding.params)
    assert torch.equal(mesh_state.field.encoding.params, before)  # the input state is untouched
    assert out.history[-1] == "MeshStage" and len(out.guidance_log) == len(mesh_state.guidance_log) + 2
    path = str(tmp_path / "m.safetensors")
    out.save(path)
    back = MeshState.load(path)
    assert torch.equal(back.vertices, out.vertices.cpu()) and torch.equal(back.faces, out.faces.cpu())
    assert back.history == out.history


def test_refine_changes_colour_only_by_default(tiny_refiner, tiny_sd, mesh_state):
    out = run_refine_stage(tiny_refiner, mesh_state, PROMPT, "", mesh_cfg(RefineConfig))
    assert torch.equal(out.vertices, mesh_state.vertices)
    assert not torch.equal(out.field.encoding.params, mesh_state.field.encoding.params)
    assert out.history[-1] == "SDXLRefine"
    geo = run_refine_stage(tiny_refiner, mesh_state, PROMPT, "", mesh_cfg(RefineConfig, optimize_geometry=True))
    assert not torch.equal(geo.vertices, mesh_state.vertices)
    with pytest.raises(DreamFlowError, match="sdxl_refiner|refiner"):
        run_refine_stage(tiny_sd, mesh_state, PROMPT, "", mesh_cfg(RefineConfig))



def test_mesh_stages_take_the_states_prompt_and_log_an_override(mesh_state, caplog):
    """The prompt is typed once (NeRF stage) and flows with the state; a differing override is logged."""
    from dreamflow.stages.mesh_stage import state_prompts

    assert mesh_state.prompt == PROMPT
    assert state_prompts(mesh_state, None, None, "MeshStage") == (PROMPT, mesh_state.negative_prompt)
    with caplog.at_level("WARNING", logger="dreamflow"):
        assert state_prompts(mesh_state, "  ", "", "MeshStage") == (PROMPT, mesh_state.negative_prompt)
        assert state_prompts(mesh_state, PROMPT + " ", None, "MeshStage")[0] == PROMPT  # the same: nothing logged
        assert not caplog.records
        assert state_prompts(mesh_state, "a blue cat", "blurry", "SDXLRefine") == ("a blue cat", "blurry")
    (record,) = [r for r in caplog.records if "prompt override" in r.getMessage()]
    assert "SDXLRefine" in record.getMessage() and "a blue cat" in record.getMessage() and PROMPT in record.getMessage()


def test_mesh_stage_without_a_prompt_runs_on_the_states_and_continues_its_own_lora(tiny_sd, mesh_state, monkeypatch):
    """run_mesh_stage(prompt=None): the state's prompt reaches the guidance and the new state. A mesh stage after a
    mesh stage continues the carried scene LoRA (as a NeRF stage continues its init's); after ExtractMesh none."""
    from dreamflow.stages import mesh_stage

    seen = []
    real = mesh_stage.optimise

    def spy(**kwargs):
        seen.append((kwargs["prompt"], kwargs["guidance_state"]))
        return real(**kwargs)

    monkeypatch.setattr(mesh_stage, "optimise", spy)
    first = run_mesh_stage(tiny_sd, mesh_state, config=mesh_cfg(iterations=1))
    assert first.prompt == PROMPT and first.lora  # APFO trained a scene LoRA
    second = run_mesh_stage(tiny_sd, first, config=mesh_cfg(iterations=1))
    assert [p for p, _ in seen] == [PROMPT, PROMPT] and second.prompt == PROMPT
    assert seen[0][1] is None and seen[1][1] is first.lora

def test_glb_and_turntable_from_mesh_state(mesh_state, tmp_path):
    import trimesh

    path = mesh_state.export_glb(str(tmp_path / "o.glb"))
    scene = trimesh.load(path)
    geom = list(scene.geometry.values())[0] if hasattr(scene, "geometry") else scene
    assert len(geom.faces) == len(mesh_state.faces)
    imgs = mesh_state.turntable(n_views=3, resolution=32)
    assert imgs.shape == (3, 32, 32, 3) and imgs.dtype == torch.float32
    assert not torch.equal(imgs[0], imgs[1]) and not torch.equal(imgs[1], imgs[2])  # three different azimuths
    assert float((imgs < 0.99).float().mean()) > 0.01  # the object is visible on white


def test_stages_train_under_a_host_inference_mode(tiny_sd, tiny_sd_path):
    """ComfyUI runs nodes under torch.inference_mode(): the stage must still optimise."""
    with torch.inference_mode():
        s = run_nerf_stage(tiny_sd, PROMPT, "", nerf_cfg(iterations=1))
    assert len(s.guidance_log) == 1 and not s.field.encoding.params.is_inference()


def test_failed_resume_removes_its_lora_from_the_shared_unet(tiny_sd, nerf_state):
    broken = nerf_state.clone()
    broken.lora = {k: v[..., :1] if v.dim() else v for k, v in broken.lora.items()}  # wrong shapes
    with pytest.raises(DreamFlowError, match="scene LoRA state does not match"):
        run_nerf_stage(tiny_sd, PROMPT, "", nerf_cfg(iterations=1), init=broken)
    assert not getattr(tiny_sd.unet, "peft_config", None)
    assert len(run_nerf_stage(tiny_sd, PROMPT, "", nerf_cfg(iterations=1)).guidance_log) == 1


def test_largest_seeds_are_valid(tiny_sd):
    s = run_nerf_stage(tiny_sd, PROMPT, "", nerf_cfg(iterations=1, seed=2 ** 64 - 1))
    assert len(s.guidance_log) == 1


def test_mesh_stages_deform_once_per_update_and_repeat_bit_for_bit(tiny_sd, tiny_refiner, mesh_state, monkeypatch):
    """Stage 2 computes the deformed geometry once per update (shared by the render and both regularisers;
    tanh runs once, the separate vertices / normals methods not at all in the loop); stage 3 with frozen
    offsets once per stage. The same seed gives the same state bit for bit."""
    from dreamflow.scene.mesh import MeshModel

    calls = {"deform": 0, "displacement": 0, "face_normals": 0, "vertex_normals": 0}
    for name in calls:
        real = getattr(MeshModel, name)

        def counted(self, *a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(MeshModel, name, counted)
    lit = dict(shading=MeshStageConfig().shading.__class__(ambient_only_steps=0, albedo_prob=0.0))
    a = run_mesh_stage(tiny_sd, mesh_state, PROMPT, "", mesh_cfg(iterations=3, **lit))
    assert calls == {"deform": 3, "displacement": 3, "face_normals": 0, "vertex_normals": 0}
    b = run_mesh_stage(tiny_sd, mesh_state, PROMPT, "", mesh_cfg(iterations=3, **lit))
    assert torch.equal(a.vertices, b.vertices) and not torch.equal(a.vertices, mesh_state.vertices)
    ta, tb = _tensors(a), _tensors(b)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert [r["loss"] for r in a.guidance_log] == [r["loss"] for r in b.guidance_log]
    for k in calls:
        calls[k] = 0
    r = run_refine_stage(tiny_refiner, mesh_state, PROMPT, "", mesh_cfg(RefineConfig, iterations=3, **lit))
    assert calls == {"deform": 1, "displacement": 1, "face_normals": 0, "vertex_normals": 0}
    assert torch.equal(r.vertices, mesh_state.vertices)


def test_mesh_stage_live_preview_shows_the_coloured_result(tiny_sd, mesh_state):
    """The live preview is the mesh as the user gets it (albedo, white background, front view: the stage's
    turntable output), not the training render (random shading, light and background)."""
    from dreamflow.stages.mesh_stage import PREVIEW_RESOLUTION

    previews = []
    cb = Callbacks(progress=lambda step, total, image: previews.append((step, image)), preview_every=1)
    grey = dict(shading=ShadingConfig(albedo_prob=0.0, textureless_prob=1.0))  # training renders: textureless only
    out = run_mesh_stage(tiny_sd, mesh_state, PROMPT, "", mesh_cfg(iterations=2, **grey), callbacks=cb)
    assert [s for s, _ in previews] == [1, 2] and all(im.size == (PREVIEW_RESOLUTION,) * 2 for _, im in previews)
    last = torch.from_numpy(np.array(previews[-1][1])).float() / 255
    want = out.turntable(1, PREVIEW_RESOLUTION)[0]
    assert (last - want).abs().max() <= 1 / 255 + 1e-6  # the final state's front view, up to 8-bit rounding
    assert torch.equal(last[0, 0], torch.ones(3))  # white background
    assert (last - 1).abs().max() > 0.05  # the object is there
