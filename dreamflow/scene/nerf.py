"""Stage-1 scene: a hash-grid NeRF (density + albedo) and a view-direction background.

Follows threestudio's ``implicit-volume`` geometry with ``no-material`` (ProlificDreamer / DreamFlow
stage 1): one hash grid feeds two small MLPs, one for density, one for albedo. World points live in
the box [-radius, radius]^3 (+Y up, object facing +Z; see render/cameras.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import check
from .hashgrid import HashGrid, HashGridConfig

DENSITY_ACTIVATIONS = ("softplus", "exp", "relu")
#: Sane upper bounds of the MLPs (threestudio: 64 wide, 1-2 hidden layers); also what a state file may claim.
MAX_MLP_WIDTH, MAX_MLP_LAYERS = 16384, 64
DENSITY_BIASES = ("magic3d", "none")
NORMAL_MODES = ("analytic", "finite_difference")


@dataclass
class NeRFFieldConfig:
    """NeRF field (defaults: threestudio ``configs/prolificdreamer.yaml``, ``implicit-volume``)."""

    radius: float = 1.0
    """Half side of the scene box [-radius, radius]^3, world units (threestudio ``radius``)."""
    grid: HashGridConfig = field(default_factory=HashGridConfig)
    """Position encoding (threestudio prolificdreamer hash grid)."""
    mlp_width: int = 64
    """Hidden width of the density and albedo MLPs (threestudio VanillaMLP ``n_neurons``)."""
    mlp_hidden_layers: int = 1
    """Hidden layers of each MLP (threestudio VanillaMLP ``n_hidden_layers``)."""
    density_activation: str = "softplus"
    """sigma = act(raw + bias): "softplus" (threestudio prolificdreamer), "exp" or "relu"."""
    density_bias: str = "magic3d"
    """Initial blob: "magic3d" adds blob_scale * (1 - |x| / blob_std) (threestudio ``blob_magic3d``) or "none"."""
    blob_scale: float = 10.0
    """Blob density bias at the centre, pre-activation (threestudio ``density_blob_scale``)."""
    blob_std: float = 0.5
    """Radius where the blob bias crosses 0, world units (threestudio ``density_blob_std``)."""
    normal: str = "analytic"
    """Normals: "analytic" (-grad sigma by autograd) or "finite_difference" (central differences)."""
    finite_difference_eps: float = 1e-3
    """Step of the finite-difference normals, world units (~2 cells of the finest 4096 level)."""
    mlp_fp16: bool = True
    """Run the density / albedo MLPs under float16 autocast on CUDA tensors (outputs float32), as tcnn's
    FullyFusedMLP does in threestudio; CPU tensors stay float32 (fp16 matmuls are slow there). Faster and lighter
    field forward + backward on CUDA (bench/RESULTS.md, "Figures moved from
    docstrings")."""

    def validate(self) -> "NeRFFieldConfig":
        check(self.radius > 0, f"NeRF radius={self.radius} must be > 0 (1.0 is usual)")
        check(1 <= self.mlp_width <= MAX_MLP_WIDTH and 1 <= self.mlp_hidden_layers <= MAX_MLP_LAYERS,
              f"NeRF MLP width={self.mlp_width} / hidden layers={self.mlp_hidden_layers} must be in 1..{MAX_MLP_WIDTH} / "
              f"1..{MAX_MLP_LAYERS} (64 / 1 is usual)")
        check(self.density_activation in DENSITY_ACTIVATIONS,
              f"density activation '{self.density_activation}' is unknown; use one of: {', '.join(DENSITY_ACTIVATIONS)}")
        check(self.density_bias in DENSITY_BIASES,
              f"density bias '{self.density_bias}' is unknown; use one of: {', '.join(DENSITY_BIASES)}")
        check(self.blob_std > 0, f"blob_std={self.blob_std} must be > 0 (0.5 is usual)")
        check(self.normal in NORMAL_MODES, f"normal mode '{self.normal}' is unknown; use one of: {', '.join(NORMAL_MODES)}")
        check(self.finite_difference_eps > 0, f"finite_difference_eps={self.finite_difference_eps} must be > 0 (1e-3 is usual)")
        self.grid.validate()
        return self


def vanilla_mlp(n_in: int, n_out: int, width: int, hidden_layers: int) -> nn.Sequential:
    """threestudio VanillaMLP: ``hidden_layers`` ReLU layers of ``width``, no biases (as tcnn FullyFusedMLP)."""
    layers: List[nn.Module] = [nn.Linear(n_in, width, bias=False), nn.ReLU()]
    for _ in range(hidden_layers - 1):
        layers += [nn.Linear(width, width, bias=False), nn.ReLU()]
    layers.append(nn.Linear(width, n_out, bias=False))
    return nn.Sequential(*layers)


class NeRFField(nn.Module):
    """Density sigma(x) >= 0 and albedo a(x) in [0, 1]^3 at world points in the scene box."""

    def __init__(self, config: Optional[NeRFFieldConfig] = None, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.config = cfg = (config or NeRFFieldConfig()).validate()
        self.encoding = HashGrid(cfg.grid, generator=generator)
        n = self.encoding.n_output_dims
        self.density_network = vanilla_mlp(n, 1, cfg.mlp_width, cfg.mlp_hidden_layers)
        self.feature_network = vanilla_mlp(n, 3, cfg.mlp_width, cfg.mlp_hidden_layers)

    # ------------------------------------------------------------------------------------------
    def _unit(self, points: torch.Tensor) -> torch.Tensor:
        """World [-r, r]^3 -> [0, 1]^3 (threestudio ``contract_to_unisphere`` for a bounded scene)."""
        r = self.config.radius
        return (points + r) / (2 * r)

    def _density_bias(self, points: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.density_bias == "magic3d":
            return cfg.blob_scale * (1 - points.norm(dim=-1) / cfg.blob_std)
        return torch.zeros_like(points[..., 0])

    def _activate(self, raw: torch.Tensor) -> torch.Tensor:
        act = self.config.density_activation
        if act == "softplus":
            return F.softplus(raw)
        if act == "exp":
            return torch.exp(raw)
        return F.relu(raw)

    def _mlp(self, network: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """``network(h)`` in float32, computed under float16 autocast on CUDA when ``mlp_fp16``."""
        if self.config.mlp_fp16 and h.is_cuda:
            with torch.autocast("cuda", dtype=torch.float16):
                return network(h).float()
        return network(h)

    def _density_from_features(self, points: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        raw = self._mlp(self.density_network, h).squeeze(-1)
        return self._activate(raw + self._density_bias(points))

    def density(self, points: torch.Tensor) -> torch.Tensor:
        """sigma at world points. Args: points [N, 3] float. Returns: [N] float32 >= 0 (per world unit)."""
        return self._density_from_features(points, self.encoding(self._unit(points)))

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        """Albedo at world points. Args: points [N, 3]. Returns: [N, 3] float32 in [0, 1] (sigmoid)."""
        return torch.sigmoid(self._mlp(self.feature_network, self.encoding(self._unit(points))))

    def normal(self, points: torch.Tensor) -> torch.Tensor:
        """Outward unit normals -grad sigma / |grad sigma| at world points [N, 3] -> [N, 3]."""
        return self.forward(points, need_normal=True)["normal"]

    def forward(self, points: torch.Tensor, need_normal: bool = False) -> Dict[str, torch.Tensor]:
        """Evaluate the field once (one hash-grid lookup for density and albedo).

        Args:
            points: [N, 3] world points (float32).
            need_normal: also return normals (analytic: one extra backward; finite differences: 6 density calls).
        Returns:
            dict ``density`` [N] >= 0, ``albedo`` [N, 3] in [0, 1], and ``normal`` [N, 3] unit (only with
            ``need_normal``). Analytic normals keep their graph while grad is enabled (for the orientation loss).
        """
        cfg = self.config
        if need_normal and cfg.normal == "analytic":
            create_graph = torch.is_grad_enabled()
            with torch.enable_grad():
                p = points.detach().requires_grad_(True)
                h = self.encoding(self._unit(p), twice_differentiable=create_graph)
                sigma = self._density_from_features(p, h)
                grad = torch.autograd.grad(sigma.sum(), p, create_graph=create_graph)[0]
            if not create_graph:
                sigma, h = sigma.detach(), h.detach()
            normal = F.normalize(-grad, dim=-1)
        else:
            h = self.encoding(self._unit(points))
            sigma = self._density_from_features(points, h)
            normal = None
            if need_normal:
                normal = self._fd_normal(points)
        out = {"density": sigma, "albedo": torch.sigmoid(self._mlp(self.feature_network, h))}
        if normal is not None:
            out["normal"] = normal
        return out

    def _fd_normal(self, points: torch.Tensor) -> torch.Tensor:
        """Central differences: grad_i ~ (sigma(x + eps e_i) - sigma(x - eps e_i)) / (2 eps)."""
        eps = self.config.finite_difference_eps
        offsets = torch.eye(3, device=points.device, dtype=points.dtype) * eps  # [3, 3]
        probe = torch.cat([points[:, None, :] + offsets, points[:, None, :] - offsets], dim=1)  # [N, 6, 3]
        s = self.density(probe.reshape(-1, 3)).view(-1, 6)
        grad = (s[:, :3] - s[:, 3:]) / (2 * eps)
        return F.normalize(-grad, dim=-1)

    def param_groups(self, lr_grid: float = 1e-2, lr_mlp: float = 1e-3) -> List[dict]:
        """Optimizer groups (threestudio prolificdreamer: encoding 1e-2, density/feature MLPs 1e-3)."""
        return [
            {"params": list(self.encoding.parameters()), "lr": lr_grid, "name": "grid"},
            {"params": list(self.density_network.parameters()) + list(self.feature_network.parameters()),
             "lr": lr_mlp, "name": "mlp"},
        ]


# ----------------------------------------------------------------------------------------------
# Background
# ----------------------------------------------------------------------------------------------
@dataclass
class BackgroundConfig:
    """Background colour by view direction (threestudio ``neural-environment-map-background``)."""

    sh_degree: int = 3
    """Spherical-harmonics encoding of the direction, tcnn "degree" (3 -> 9 coefficients; threestudio)."""
    mlp_width: int = 16
    """Hidden width (threestudio background VanillaMLP ``n_neurons``)."""
    mlp_hidden_layers: int = 2
    """Hidden layers (threestudio background VanillaMLP ``n_hidden_layers``)."""
    random_aug: bool = True
    """While training, replace the background by a random solid colour per view (threestudio prolificdreamer)."""
    random_aug_prob: float = 0.5
    """Probability of that replacement, per view (threestudio ``random_aug_prob``)."""


def spherical_harmonics(d: torch.Tensor, degree: int = 3) -> torch.Tensor:
    """Real SH basis (tcnn ``SphericalHarmonics`` constants) of unit directions [..., 3] -> [..., degree^2]."""
    x, y, z = d.unbind(-1)
    out = [torch.full_like(x, 0.28209479177387814)]
    if degree > 1:
        out += [-0.48860251190291987 * y, 0.48860251190291987 * z, -0.48860251190291987 * x]
    if degree > 2:
        xy, yz, xz, x2, y2, z2 = x * y, y * z, x * z, x * x, y * y, z * z
        out += [1.0925484305920792 * xy, -1.0925484305920792 * yz, 0.94617469575755997 * z2 - 0.31539156525251999,
                -1.0925484305920792 * xz, 0.54627421529603959 * x2 - 0.54627421529603959 * y2]
    return torch.stack(out, dim=-1)


class Background(nn.Module):
    """rgb(direction): small MLP on the SH-encoded view direction, sigmoid output in [0, 1]."""

    def __init__(self, config: Optional[BackgroundConfig] = None):
        super().__init__()
        self.config = cfg = config or BackgroundConfig()
        check(cfg.sh_degree in (1, 2, 3), f"background sh_degree={cfg.sh_degree} is unsupported; use 1, 2 or 3")
        check(1 <= cfg.mlp_width <= MAX_MLP_WIDTH and 1 <= cfg.mlp_hidden_layers <= MAX_MLP_LAYERS,
              f"background MLP width={cfg.mlp_width} / hidden layers={cfg.mlp_hidden_layers} must be in "
              f"1..{MAX_MLP_WIDTH} / 1..{MAX_MLP_LAYERS} (16 / 2 is usual)")
        check(0.0 <= cfg.random_aug_prob <= 1.0, f"background random_aug_prob={cfg.random_aug_prob} must be in [0, 1]")
        self.network = vanilla_mlp(cfg.sh_degree ** 2, 3, cfg.mlp_width, cfg.mlp_hidden_layers)

    def forward(self, dirs: torch.Tensor, generator: Optional[torch.Generator] = None,
                solid: Optional[Sequence[float]] = None) -> torch.Tensor:
        """Background colour for ray directions.

        Args:
            dirs: [V, ..., 3] unit world directions (V views first).
            generator: generator of the random solid colours (training with ``random_aug``); draws happen on its
                device, so one on ``dirs``' device avoids a host-to-device copy (a stream sync) per call.
            solid: an (r, g, b) in [0, 1] to return instead (previews, e.g. white).
        Returns:
            [V, ..., 3] float32 in [0, 1].
        """
        if solid is not None:
            return solid_color(dirs, solid)
        rgb = torch.sigmoid(self.network(spherical_harmonics(F.normalize(dirs.float(), dim=-1), self.config.sh_degree)))
        if self.training and self.config.random_aug:
            V = dirs.shape[0]
            extra = (1,) * (dirs.dim() - 2)
            where = generator.device if generator is not None else rgb.device
            replace = torch.rand(V, generator=generator, device=where) < self.config.random_aug_prob
            colour = torch.rand(V, 3, generator=generator, device=where)
            replace = replace.to(rgb.device).view(V, *extra, 1)
            rgb = torch.where(replace, colour.to(rgb.device).view(V, *extra, 3), rgb)
        return rgb

    def param_groups(self, lr: float = 1e-3) -> List[dict]:
        """Optimizer group (threestudio prolificdreamer: background 1e-3)."""
        return [{"params": list(self.parameters()), "lr": lr, "name": "background"}]


def solid_color(dirs: torch.Tensor, color: Union[float, Sequence[float]]) -> torch.Tensor:
    """A constant colour shaped like ``dirs`` [..., 3] (grey level or (r, g, b) in [0, 1])."""
    c = torch.as_tensor(color, dtype=torch.float32, device=dirs.device).reshape(-1)
    check(c.numel() in (1, 3), f"solid background colour {list(c.tolist())} must be one grey level or (r, g, b)")
    return c.expand(3).expand(*dirs.shape[:-1], 3) if c.numel() == 1 else c.expand(*dirs.shape[:-1], 3)
