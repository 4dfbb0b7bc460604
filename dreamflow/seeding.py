"""Seeds: one user seed drives every random stream of a run (same seed + settings + device -> same result)."""

from __future__ import annotations

import contextlib

import torch

# Offsets of the random streams one user seed drives (``derived_seed(seed, OFFSET)``). Values are fixed: changing
# one changes every run's result for that seed. Module initialisation and the guidance's noise share offset 0 (two
# different generators: torch's global CPU RNG under :func:`seeded`, and the guidance's own generator on the
# denoiser's device); they were so before the offsets had names, and runs stay reproducible across versions.
SEED_MODULE_INIT = 0
"""Initial weights of the fields / meshes a stage builds (:func:`seeded`)."""
SEED_GUIDANCE_NOISE = 0
"""The guidance's generator: its noise eps, random t (SDS / VSD) and the scene LoRA's draws."""
SEED_SCENE_LORA = 1
"""The scene LoRA's initial weights (peft's Kaiming-uniform A matrices)."""
SEED_VAE_SAMPLE = 3
"""The VAE posterior sample of every encode in the stage loop."""
SEED_HOST_CHOICES = 7
"""Host-side choices of the NeRF / mesh stages (shading mode, light direction), and on CPU their renders too."""
SEED_RENDER = 11
"""On-device random draws of the NeRF / mesh renders (stratified sample jitter, background) on CUDA."""


def derived_seed(seed: int, offset: int) -> int:
    """``seed + offset`` wrapped into torch's seed range [0, 2^64), so seeds near 2^64 - 1 stay valid."""
    return (int(seed) + int(offset)) % (1 << 64)


@contextlib.contextmanager
def seeded(seed: int):
    """Seed torch's global CPU RNG for module initialisation without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(seed, SEED_MODULE_INIT))
        yield
