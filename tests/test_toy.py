"""The toy world, the shipped prior ``dreamflow-toy``, its classifier and the demo's prompt check.

World renders are compared with their brute-force twin (``render_mesh`` with the colour, ambient and background
applied directly); the prior is checked by name through ``Denoiser.load`` and the LoadDenoiser node, by what it
knows (its denoising error is lower for the true caption than for a wrong one), and by a short CPU run whose
mesh comes out in the prompt's colour.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from dreamflow.errors import DreamFlowError
from dreamflow.render.cameras import VIEW_WORDS, CameraConfig, sample_cameras, view_prompt
from dreamflow.render.shading import ShadingConfig, random_light
from dreamflow.toy import world as W
from dreamflow.toy.prior import TOY_MODEL_NAME, folder_size_mb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(REPO, "models", TOY_MODEL_NAME)


def _cams(n, seed=0, res=32):
    gen = torch.Generator().manual_seed(seed)
    cams = sample_cameras(CameraConfig(), n, res, generator=gen)
    return cams, random_light(cams, gen)


# --------------------------------------------------------------------------------------------
# World
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", W.SHAPES)
def test_meshes_closed_outward_centred(shape):
    v, f = W.shape_mesh(shape)
    tri = v[f].double()
    # Signed volume (divergence theorem) > 0 <=> faces wind counter-clockwise seen from outside.
    vol = (tri[:, 0] * torch.cross(tri[:, 1], tri[:, 2], dim=-1)).sum() / 6
    assert vol > 0.01
    radius = v.norm(dim=1).max()
    assert 0.4 <= radius <= 0.7, radius  # the stages' framing: object radius ~0.5 in [-1, 1]^3
    centre = (v.max(0).values + v.min(0).values) / 2
    assert centre.abs().max() < 0.05
    if shape == "sphere":  # polygonal sphere volume within 2% of 4/3 pi r^3
        assert abs(vol - 4 / 3 * math.pi * 0.45 ** 3) / (4 / 3 * math.pi * 0.45 ** 3) < 0.02


def test_compose_equals_direct_render():
    """Fast path (geometry once, colours composed) == brute force (render_mesh with that colour, k_a, k_d, bg)."""
    from dreamflow.render.mesh_render import render_mesh

    cams, lights = _cams(3, seed=1)
    for shape in ("cube", "mushroom"):
        geo = W.render_geometry(shape, cams, lights, backend="torch")
        colour, second = torch.tensor(W.COLOURS["purple"]), torch.tensor(W.SECONDARY_COLOURS["mushroom"])
        a, bg = 0.35, torch.tensor([0.2, 0.9, 0.6])
        fast = W.compose(geo["A"], geo["L"], geo["O"], colour.expand(3, 3), second.expand(3, 3), torch.full((3,), a),
                         bg.expand(3, 3))
        v, f = W.shape_mesh(shape)

        def albedo(p):
            m = W.part_masks(shape, p)
            return m[:, :1] * colour + m[:, 1:2] * second

        brute = render_mesh(v, f, albedo, cams, background=bg, light_positions=lights, shading="lambertian",
                            shading_config=ShadingConfig(ambient=a, diffuse=1 - a), backend="torch")["rgb"]
        assert torch.allclose(fast, brute.clamp(0, 1), atol=1e-5), (fast - brute).abs().max()
        assert geo["O"].mean() > 0.02  # something was drawn


def test_red_cube_is_red_and_captions_have_view_words():
    cams, lights = _cams(6, seed=2)
    geo = W.render_geometry("cube", cams, lights, backend="torch")
    img = W.compose(geo["A"], geo["L"], geo["O"], W.colour_tensor(["red"] * 6), W.secondary_tensor(["cube"] * 6),
                    torch.full((6,), 0.4), torch.full((6, 3), 0.8))
    fg = img[geo["O"][..., 0] > 0.99]
    assert fg.shape[0] > 50
    r, g, b = fg.mean(0).tolist()
    assert r > 2 * g and r > 2 * b, (r, g, b)
    images, caps = W.render_world("cube", "red", 4, seed=3, cfg=W.WorldConfig(resolution=32), backend="torch")
    assert images.shape == (4, 32, 32, 3)
    for c in caps:
        word = c.split(", ")[1].split()[0]
        assert word in VIEW_WORDS and c == view_prompt("a red cube", word)


def test_world_is_deterministic():
    cfg = W.WorldConfig(resolution=32)
    a, ca = W.render_world("torus", "blue", 3, seed=5, cfg=cfg, backend="torch")
    b, cb = W.render_world("torus", "blue", 3, seed=5, cfg=cfg, backend="torch")
    c, _ = W.render_world("torus", "blue", 3, seed=6, cfg=cfg, backend="torch")
    assert torch.equal(a, b) and ca == cb
    assert not torch.equal(a, c)


def test_prompts_parse_and_refuse_outside_world():
    assert W.parse_prompt("a green cone") == ("cone", "green")
    assert W.parse_prompt("An Orange torus.") == ("torus", "orange")
    assert W.parse_prompt("a red cube, side view") == ("cube", "red")
    assert W.caption("cube", "orange") == "an orange cube"
    with pytest.raises(DreamFlowError) as e:
        W.parse_prompt("a corgi standing up drinking boba")
    msg = str(e.value)
    assert "\n" not in msg and all(s in msg for s in W.SHAPES) and all(c in msg for c in W.COLOUR_NAMES)


def test_caption_table_matches_indices(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from toy_training import caption_index, caption_table

    table = caption_table()
    assert len(table) == len(W.SHAPES) * len(W.COLOUR_NAMES) * len(VIEW_WORDS) + 1 and table[-1] == ""
    s, c, v = torch.tensor([6]), torch.tensor([5]), torch.tensor([1])
    assert table[int(caption_index(s, c, v))] == view_prompt(W.caption("mushroom", "orange"), "side")


def test_demo_refuses_prompt_outside_world(capsys):
    from dreamflow import demo

    assert demo.main(["--prompt", "a corgi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "snowman" in err[0] and "purple" in err[0]


# --------------------------------------------------------------------------------------------
# Shipped prior and classifier
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy():
    from dreamflow.denoisers import Denoiser

    return Denoiser.load(TOY_MODEL_NAME, device="cpu")


def test_shipped_prior_layout_and_size():
    from dreamflow.denoisers import list_models, resolve_model

    assert TOY_MODEL_NAME in list_models()
    assert os.path.samefile(resolve_model(TOY_MODEL_NAME), MODEL_DIR)
    assert folder_size_mb(MODEL_DIR) <= 20.0
    for root, _, files in os.walk(MODEL_DIR):
        for n in files:
            assert n.endswith((".json", ".safetensors", ".txt")), n  # no pickle anywhere
    from safetensors import safe_open

    with safe_open(os.path.join(MODEL_DIR, "unet", "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_slice(next(iter(f.keys()))).get_dtype() == "F16"


def test_prior_loads_by_name(toy):
    assert toy.kind == "sd" and toy.native_resolution == 64 and toy.prediction_type == "epsilon"
    assert toy.unet.dtype == torch.float32  # float16 weights upcast on CPU
    tok = toy.tokenizer
    for w in W.WORDS:  # every world word is one token
        assert len(tok.tokenize(w)) == 1, w


def test_prior_loads_through_node():
    from dreamflow.runner.defs import load_node_pack

    nodes = load_node_pack().NODE_CLASS_MAPPINGS
    if "DreamFlowLoadDenoiser" not in nodes:
        pytest.skip("LoadDenoiser node not available")
    cls = nodes["DreamFlowLoadDenoiser"]
    names = cls.INPUT_TYPES()["required"]["model_name"][0]
    assert TOY_MODEL_NAME in names
    (den,) = getattr(cls(), cls.FUNCTION)(TOY_MODEL_NAME, "auto", "cpu", False, False, "graphs+compile", "auto")
    assert den.native_resolution == 64


def test_prior_knows_the_world(toy):
    """Denoising error of world images is lower under the true caption than under a wrong colour or shape."""
    gen = torch.Generator().manual_seed(0)
    cams, lights = _cams(4, seed=7, res=64)
    worse = []
    for shape, colour, wrong in (("cube", "red", "a blue cube"), ("sphere", "yellow", "a yellow torus")):
        geo = W.render_geometry(shape, cams, lights, backend="torch")
        img = W.compose(geo["A"], geo["L"], geo["O"], W.colour_tensor([colour] * 4), W.secondary_tensor([shape] * 4),
                        torch.full((4,), 0.5), torch.full((4, 3), 0.85))
        with torch.no_grad():
            x0 = toy.encode_images(img.permute(0, 3, 1, 2), sample=False)
            words = cams.view_words()
            errs = {}
            for text in (W.caption(shape, colour), wrong):
                e = toy.encode_prompt([view_prompt(text, w) for w in words])
                tot = 0.0
                for t in (0.3, 0.5, 0.7):
                    eps = torch.randn(x0.shape, generator=gen)
                    gen_state = gen.get_state()
                    pred = toy.predict_eps(toy.add_noise(x0, eps, t), t, e, 1.0)
                    tot += float((pred - eps).square().mean())
                    gen.set_state(gen_state)
                errs[text] = tot
        worse.append(errs[wrong] / errs[W.caption(shape, colour)])
    assert min(worse) > 1.02, worse


def test_classifier_recognises_fresh_world_images():
    from dreamflow.toy.classifier import accuracy, load_classifier, r_precision

    clf = load_classifier(os.path.join(MODEL_DIR, "classifier", "model.safetensors"))
    cams, lights = _cams(6, seed=99, res=64)
    imgs, sid, cid = [], [], []
    for s, shape in enumerate(W.SHAPES):
        geo = W.render_geometry(shape, cams, lights, backend="torch")
        imgs.append(W.compose(geo["A"], geo["L"], geo["O"], W.colour_tensor(W.COLOUR_NAMES),
                              W.secondary_tensor([shape] * 6), torch.full((6,), 0.5), torch.rand(6, 3, generator=torch.Generator().manual_seed(s))))
        sid += [s] * 6
        cid += list(range(6))
    x = torch.cat(imgs).permute(0, 3, 1, 2)
    acc = accuracy(clf, x, torch.tensor(sid), torch.tensor(cid))
    assert acc["joint"] >= 0.9, acc
    # r_precision == brute force over objects (one view each).
    lp = clf.log_probs(x).unsqueeze(1)
    rp = r_precision(lp, list(zip(sid, cid)))
    brute = sum(int(lp[i, 0].argmax()) == sid[i] * 6 + cid[i] for i in range(len(sid))) / len(sid)
    assert rp["r_precision"] == pytest.approx(brute) and rp["r_precision"] == pytest.approx(acc["joint"])


# --------------------------------------------------------------------------------------------
# A short CPU run
# --------------------------------------------------------------------------------------------
def test_short_run_mesh_has_prompt_colour(toy):
    from dreamflow.guidance import GuidanceConfig
    from dreamflow.render.cameras import orbit_cameras
    from dreamflow.render.mesh_render import render_mesh
    from dreamflow.render.volume import VolumeRenderConfig
    from dreamflow.scene.hashgrid import HashGridConfig
    from dreamflow.scene.nerf import NeRFFieldConfig
    from dreamflow.stages import ExtractConfig, NeRFStageConfig, extract_mesh_state, run_nerf_stage

    # Short-run learning rates (threestudio's 1e-2 / 1e-3 are for 25k updates; measured: at 40 updates the
    # albedo MLP needs 3e-2 to leave its initial grey).
    cfg = NeRFStageConfig(iterations=40, views_per_update=2, resolution=32, denoise_resolution=64, seed=0,
                          lr_grid=5e-2, lr_mlp=3e-2,
                          guidance=GuidanceConfig(method="apfo", cfg_scale=7.5, t_start=1.0, t_end=0.2),
                          nerf=NeRFFieldConfig(grid=HashGridConfig(n_levels=6, log2_hashmap_size=14)),
                          render=VolumeRenderConfig(n_samples=24, n_importance=16))
    nerf = run_nerf_stage(toy, "a red sphere", "", cfg)
    mesh = extract_mesh_state(nerf, ExtractConfig(resolution=48, face_budget=2000))
    # The mesh's colour as seen: rasterized albedo of the covered pixels of a turntable.
    out = render_mesh(mesh.vertices, mesh.faces.int(), mesh.color_fn(), orbit_cameras(8, 48), backend="torch")
    seen = out["rgb"][out["opacity"][..., 0] > 0.99]
    assert mesh.faces.shape[0] > 100 and seen.shape[0] > 200
    r, g, b = seen.mean(0).tolist()
    assert r > g + 0.2 and r > b + 0.2, (r, g, b)
    r, g, b = mesh.color_fn()(mesh.vertices).mean(0).tolist()  # the texture the GLB bakes: same verdict
    assert r > g + 0.2 and r > b + 0.2, (r, g, b)


def test_prior_probe_measures_tell_a_square_from_a_star():
    """bench/prior_probe.py's silhouette measures: a filled square is convex (solidity 1) with aspect 1, a
    rectangle keeps its aspect, a plus-shaped star has solidity well below 1, an empty image gives NaNs."""
    import math

    import numpy as np

    from bench.prior_probe import measures

    sq = np.zeros((64, 64), bool)
    sq[16:48, 16:48] = True
    assert measures(sq) == pytest.approx((1.0, 1.0), abs=1e-6)
    rect = np.zeros((64, 64), bool)
    rect[8:56, 20:44] = True
    assert measures(rect)[0] == pytest.approx(0.5)
    star = np.zeros((64, 64), bool)
    star[28:36, 8:56] = True
    star[8:56, 28:36] = True
    assert measures(star)[1] < 0.5
    assert all(math.isnan(v) for v in measures(np.zeros((64, 64), bool)))
