"""Seeds: one user seed drives every random stream of a run (same seed + settings + device -> same result)."""

from __future__ import annotations

import contextlib

import torch


def derived_seed(seed: int, offset: int) -> int:
    """``seed + offset`` wrapped into torch's seed range [0, 2^64), so seeds near 2^64 - 1 stay valid."""
    return (int(seed) + int(offset)) % (1 << 64)


@contextlib.contextmanager
def seeded(seed: int):
    """Seed torch's global CPU RNG for module initialisation without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(seed, 0))
        yield
