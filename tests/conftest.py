"""Shared fixtures: tiny diffusers pipelines built offline (session-scoped, in temporary folders).

``tiny_sd_path`` / ``tiny_sd_v_path`` / ``tiny_refiner_path``: folders written by ``dreamflow.denoisers.tiny``
(SD epsilon, SD v-prediction, SDXL refiner; 16 px images, 8x8x4 latents, CLIP width 32).
``tiny_sd`` / ``tiny_refiner``: those loaded with ``Denoiser.load`` on CPU in float32. They are shared by the
whole session: a test that changes one (e.g. adds a scene LoRA) must undo it (``SceneDenoiser.remove()``).
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory) -> str:
    from dreamflow.denoisers.tiny import build_tiny_sd

    return build_tiny_sd(str(tmp_path_factory.mktemp("tiny_sd") / "tiny-sd"), prediction_type="epsilon", seed=0)


@pytest.fixture(scope="session")
def tiny_sd_v_path(tmp_path_factory) -> str:
    from dreamflow.denoisers.tiny import build_tiny_sd

    return build_tiny_sd(str(tmp_path_factory.mktemp("tiny_sd_v") / "tiny-sd-v"), prediction_type="v_prediction",
                         seed=1)


@pytest.fixture(scope="session")
def tiny_refiner_path(tmp_path_factory) -> str:
    from dreamflow.denoisers.tiny import build_tiny_sdxl_refiner

    return build_tiny_sdxl_refiner(str(tmp_path_factory.mktemp("tiny_refiner") / "tiny-refiner"), seed=2)


@pytest.fixture(scope="session")
def tiny_sd(tiny_sd_path):
    from dreamflow.denoisers import Denoiser

    return Denoiser.load(tiny_sd_path, dtype="fp32", device="cpu")


@pytest.fixture(scope="session")
def tiny_refiner(tiny_refiner_path):
    from dreamflow.denoisers import Denoiser

    return Denoiser.load(tiny_refiner_path, dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def torch_single_thread():
    """Run a test module with one intra-op thread, then restore the previous count.

    Tiny models are op-launch bound: a second OpenMP thread only adds barrier waits, and on a busy 2-core box
    they dominate (measured: tests/test_scene_lora.py 10.5 s with 1 thread vs 73 s with 2 under load average 6).
    Use with ``pytestmark = pytest.mark.usefixtures("torch_single_thread")``.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
