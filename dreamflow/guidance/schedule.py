"""APFO's predetermined, decreasing timestep schedule.

DreamFlow (Lee, Sohn & Shin, ICLR 2024) integrates an approximate probability-flow ODE from
t_start down to t_end. The timesteps are fixed before optimisation starts (unlike SDS/VSD's random
t): ``n_levels + 1`` points t_0 = t_start > t_1 > ... > t_n = t_end, and update ``step`` uses the
pair (t_i, t_{i+1}) with ``i = step // updates_per_t``: several updates (each on new random views)
share one t_i, so the ODE step is amortised over views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch

from ..errors import check


@dataclass(frozen=True)
class TimestepSchedule:
    """Serializable APFO schedule (``to_dict`` / ``from_dict`` round trip).

    Args:
        t_start: first timestep, in [0, 1] (fraction of the 1000 training steps). Stage 1 default 1.0.
        t_end: last timestep, < t_start. Stage 1 default 0.2 (paper: stage 1 1.0 -> 0.2).
        total_updates: number of optimisation updates the schedule covers.
        updates_per_t: updates that share one t_i (amortised over views); default 4 (ours).
        spacing: "linear" in t (default, ours) or "sigma" (linear in EDM sigma).
    """

    t_start: float
    t_end: float
    total_updates: int
    updates_per_t: int = 4
    spacing: str = "linear"

    def __post_init__(self):
        check(0.0 <= self.t_end < self.t_start <= 1.0,
              f"timestep schedule t_start={self.t_start} -> t_end={self.t_end} must decrease within [0, 1]; "
              f"give t_start > t_end, e.g. 1.0 -> 0.2")
        check(self.total_updates >= 1, f"iterations={self.total_updates} must be >= 1")
        check(self.updates_per_t >= 1, f"updates_per_t={self.updates_per_t} must be >= 1")
        check(self.spacing in ("linear", "sigma"), f"schedule spacing '{self.spacing}' unknown; use linear or sigma")

    @property
    def n_levels(self) -> int:
        """Number of distinct timesteps t_0..t_{n-1} that updates use."""
        return math.ceil(self.total_updates / self.updates_per_t)

    def timesteps(self, sigma_fn=None) -> torch.Tensor:
        """[n_levels + 1] float64, strictly decreasing, from t_start to t_end inclusive.

        ``spacing="sigma"`` needs ``sigma_fn`` (a denoiser's ``sigma``) and spaces sigma linearly.
        """
        n = self.n_levels
        if self.spacing == "linear" or sigma_fn is None:
            return torch.linspace(self.t_start, self.t_end, n + 1, dtype=torch.float64)
        grid = torch.linspace(self.t_start, self.t_end, 4097, dtype=torch.float64)
        s = sigma_fn(grid.float()).double().cpu()
        targets = torch.linspace(float(s[0]), float(s[-1]), n + 1, dtype=torch.float64)
        # s decreases along grid: invert by interpolation on the reversed arrays
        idx = torch.searchsorted(s.flip(0).contiguous(), targets.contiguous()).clamp(1, grid.numel() - 1)
        xs, ys = s.flip(0), grid.flip(0)
        x0, x1, y0, y1 = xs[idx - 1], xs[idx], ys[idx - 1], ys[idx]
        ts = y0 + (targets - x0) * (y1 - y0) / (x1 - x0).clamp_min(1e-12)
        ts[0], ts[-1] = self.t_start, self.t_end
        return ts

    def level(self, step: int) -> int:
        """Index i of the timestep used by update ``step`` (clamped to the last level)."""
        return min(max(step, 0) // self.updates_per_t, self.n_levels - 1)

    def at(self, step: int, sigma_fn=None) -> Tuple[float, float]:
        """(t_i, t_{i+1}) for update ``step``."""
        ts = self._cached(sigma_fn)
        i = self.level(step)
        return float(ts[i]), float(ts[i + 1])

    def _cached(self, sigma_fn):
        key = "_ts_sigma" if (self.spacing == "sigma" and sigma_fn is not None) else "_ts"
        ts = self.__dict__.get(key)
        if ts is None:
            ts = self.timesteps(sigma_fn)
            object.__setattr__(self, key, ts)
        return ts

    def to_dict(self) -> dict:
        return {"t_start": self.t_start, "t_end": self.t_end, "total_updates": self.total_updates,
                "updates_per_t": self.updates_per_t, "spacing": self.spacing}

    @classmethod
    def from_dict(cls, d: dict) -> "TimestepSchedule":
        return cls(**d)
