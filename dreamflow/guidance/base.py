"""The guidance interface shared by APFO (DreamFlow), SDS and VSD.

A guidance turns latents of the current renders into a loss whose gradient moves the 3D scene.
All three methods share one call signature, so stages compare them on equal terms::

    guidance = make_guidance(denoiser, GuidanceConfig(method="apfo"), total_updates=2500, seed=0)
    out = guidance(latents, embeds, camera, step)      # GuidanceOutput
    out.loss.backward()                                # moves the scene through the latents

Every method writes its update as a stop-gradient target (threestudio's formulation):
``loss = 0.5 * ||x - stopgrad(x - g)||^2 / B`` has gradient ``g / B`` w.r.t. ``x``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from ..denoisers.scene import SceneLoRAConfig
from ..denoisers.scene_model import SceneModel
from ..errors import DivergenceError, check
from ..seeding import SEED_GUIDANCE_NOISE, SEED_SCENE_LORA, derived_seed

#: name -> Guidance subclass, filled by :func:`register` (each method's module registers itself; the package's
#: ``__init__`` imports every module of ``guidance/``, so a new method is one new file).
REGISTRY: Dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a :class:`Guidance` subclass available as ``GuidanceConfig(method=cls.name)``."""
    check(isinstance(cls, type) and issubclass(cls, Guidance) and cls.name not in ("", "base"),
          f"register() takes a Guidance subclass with its own name, got {cls!r}")
    check(REGISTRY.get(cls.name, cls) is cls, f"guidance method '{cls.name}' is registered twice "
          f"({REGISTRY.get(cls.name)!r} and {cls!r}); give the new class another name")
    REGISTRY[cls.name] = cls
    return cls


def methods() -> Tuple[str, ...]:
    """Registered method names, in their dropdown order (``Guidance.order``, then name)."""
    return tuple(sorted(REGISTRY, key=lambda n: (REGISTRY[n].order, n)))


@dataclass
class GuidanceConfig:
    """Settings of a guidance method (one config for all three; fields a method does not use are ignored)."""

    method: str = "apfo"
    """A registered method (``guidance.methods()``): "apfo" (DreamFlow, default) or the baselines "sds" (DreamFusion)
    and "vsd" (ProlificDreamer)."""
    cfg_scale: float = 7.5
    """Classifier-free guidance scale of the pretrained model (ProlificDreamer / threestudio VSD: 7.5;
    DreamFusion's SDS used 100)."""
    t_start: float = 1.0
    """APFO: first timestep of the schedule; SDS/VSD: largest random t. Fraction of the 1000 training steps."""
    t_end: float = 0.2
    """APFO: last timestep; SDS/VSD: smallest random t. Stage 1: 1.0 -> 0.2 (paper)."""
    updates_per_t: int = 4
    """APFO: updates sharing one timestep t_i, each on fresh random views (ours)."""
    spacing: str = "linear"
    """APFO: schedule spacing, "linear" in t (ours) or "sigma" (linear in EDM sigma: every ODE step
    sigma_i - sigma_{i+1} the same size)."""
    step_scale: str = "ode"
    """APFO: size of the target's step. "ode" (the paper): x_hat = x - (sigma_i - sigma_{i+1}) (eps_pretrained -
    eps_scene), whose steps sum to sigma(t_start) - sigma(t_end) whatever the number of updates, so each update's
    step shrinks as the budget grows; "mean": the step divided by the schedule's mean step (sigma_0 - sigma_n) / n,
    so the guidance keeps the same size against the regularisers and Adam's running scale at any budget (the
    schedule's shape, large steps early with "linear" spacing, is kept)."""
    weighting: str = "sds"
    """SDS/VSD weight w(t): "sds" = 1 - alpha_bar(t) (threestudio) or "uniform" = 1."""
    lora: SceneLoRAConfig = field(default_factory=SceneLoRAConfig)
    """APFO/VSD: the scene LoRA (SceneLoRAConfig: rank 4, lr 1e-4, camera-conditioned; threestudio VSD)."""
    lora_steps_per_update: int = 1
    """APFO/VSD: LoRA optimiser steps per scene update (threestudio: 1)."""
    lora_shares_noise: bool = True
    """APFO: True (default) = the update's first LoRA step trains on the same noisy latents x_t (same t_i, same eps)
    whose scene prediction eps_phi enters the target, so one scene-model UNet forward serves both (ProlificDreamer's
    Algorithm 1 updates the particle and the LoRA with one draw); eps_phi is read before the LoRA step changes the
    LoRA, and the main stream waits for that forward before the CFG call (two graph replays side by side hung the
    GPU in bench/RESULTS.md run 5). Faster updates in every stage at no loss of toy-world R-precision (run 6,
    "The two levers" and "Quality of the new default"). With the camera-dropout coin fallen (camera_dropout, 10% of updates) eps_phi is then the
    camera-free prediction. False: the LoRA step draws fresh noise at the same t_i and runs its own forward
    (threestudio's way; one more scene-model call per update)."""

    def validate(self) -> "GuidanceConfig":
        check(self.method in REGISTRY, f"guidance method '{self.method}' is unknown; use one of: {', '.join(methods())}")
        check(self.cfg_scale >= 1.0, f"cfg_scale={self.cfg_scale} must be >= 1 (1 = no classifier-free guidance)")
        check(0.0 <= self.t_end < self.t_start <= 1.0,
              f"t_start={self.t_start} must be greater than t_end={self.t_end}, both in [0, 1]; e.g. 1.0 -> 0.2")
        check(self.updates_per_t >= 1, f"updates_per_t={self.updates_per_t} must be >= 1")
        check(self.step_scale in ("ode", "mean"), f"step_scale '{self.step_scale}' is unknown; use ode or mean")
        check(self.weighting in ("sds", "uniform"), f"weighting '{self.weighting}' is unknown; use sds or uniform")
        check(self.lora_steps_per_update >= 0, f"lora_steps_per_update={self.lora_steps_per_update} must be >= 0")
        return self


@dataclass
class GuidanceOutput:
    """What one guidance call returns.

    Attributes:
        loss: scalar, differentiable w.r.t. the latents it was given.
        target: [B, C, h, w] the stop-gradient target x_hat (detached).
        log: diagnostics for plots, 0-dim tensors or floats (no host sync in the loop):
            ``t``, ``sigma``, ``grad_norm`` (mean over views of ||x - x_hat||), and per method
            ``sigma_next`` (APFO), ``lora_loss`` (APFO/VSD).
    """

    loss: torch.Tensor
    target: torch.Tensor
    log: Dict[str, object]


class Guidance:
    """Base class: holds the denoiser, the config, a seeded noise generator and, for APFO / VSD, the scene model
    (:class:`~dreamflow.denoisers.scene_model.SceneModel`: ``scene_model.eps()`` and ``scene_model.step()``; how they
    run, eagerly, from CUDA graphs or overlapped on a second stream, is its business)."""

    name = "base"
    """The method's name in ``GuidanceConfig.method`` and the nodes' dropdown."""
    order = 100
    """Position in the dropdown (lower first; DreamFlow's APFO is 0)."""
    summary = ""
    """One line on the method for the nodes' dropdown tooltip (shown as ``name: summary``)."""
    uses_scene_lora = False

    def __init__(self, denoiser, config: GuidanceConfig, total_updates: int, seed: int = 0):
        self.denoiser = denoiser
        self.config = config.validate()
        self.total_updates = int(total_updates)
        check(self.total_updates >= 1, f"iterations={total_updates} must be >= 1")
        self.generator = torch.Generator(device=denoiser.device).manual_seed(derived_seed(seed, SEED_GUIDANCE_NOISE))
        #: the scene model (APFO / VSD): eps() and step(), eager / graphed / overlapped behind one door
        self.scene_model: Optional[SceneModel] = None
        if self.uses_scene_lora:
            self.scene_model = SceneModel(denoiser, config.lora, seed=derived_seed(seed, SEED_SCENE_LORA))

    @property
    def scene(self):
        """The scene LoRA network (:class:`~dreamflow.denoisers.scene.SceneDenoiser`), None without one or after
        :meth:`close` (tests may put a stand-in here)."""
        return None if self.scene_model is None else self.scene_model.net

    @scene.setter
    def scene(self, net) -> None:
        check(self.scene_model is not None, f"guidance '{self.name}' has no scene model")
        self.scene_model.net = net

    # -- helpers shared by the methods -------------------------------------------------------
    def _t(self, value, batch: int) -> torch.Tensor:
        return torch.full((batch,), float(value), device=self.denoiser.device, dtype=torch.float32)

    def _random_t(self, batch: int) -> torch.Tensor:
        """t ~ U[t_end, t_start] per view (SDS/VSD; threestudio samples one t per batch element)."""
        lo, hi = self.config.t_end, self.config.t_start
        u = torch.rand(batch, generator=self.generator, device=self.denoiser.device)
        return lo + (hi - lo) * u

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)

    def _weight(self, t: torch.Tensor) -> torch.Tensor:
        if self.config.weighting == "uniform":
            return torch.ones_like(t)
        return 1.0 - self.denoiser.alpha_bar(t)

    @torch.no_grad()
    def _noisy(self, x: torch.Tensor, t: torch.Tensor):
        """Noise ``x`` at ``t`` with a seeded eps; return (eps, x_t), no grad."""
        eps = self._noise(x)
        return eps, self.denoiser.add_noise(x.detach(), eps, t)

    @torch.no_grad()
    def _pretrained_eps(self, x_t: torch.Tensor, t: torch.Tensor, embeds) -> torch.Tensor:
        """The pretrained model's CFG prediction at ``x_t`` (float32), no grad."""
        return self.denoiser.predict_eps(x_t, t, embeds, self.config.cfg_scale).float()

    def _noisy_prediction(self, x: torch.Tensor, t: torch.Tensor, embeds):
        """:meth:`_noisy`, then (eps, x_t, eps_pretrained with CFG), no grad."""
        eps, x_t = self._noisy(x, t)
        return eps, x_t, self._pretrained_eps(x_t, t, embeds)

    @staticmethod
    def target_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """``0.5 * ||x - stopgrad(x_hat)||^2`` summed per view, averaged over views."""
        return 0.5 * (x - x_hat.detach()).pow(2).sum() / x.shape[0]

    def join(self) -> None:
        """Order the current stream after the scene model's overlapped LoRA steps (no host sync; see SceneModel)."""
        if self.scene_model is not None:
            self.scene_model.join()

    def check_finite(self, loss: torch.Tensor, log: Dict[str, object]) -> None:
        """One host sync: raise DivergenceError if the scene ``loss`` or this update's LoRA loss is not finite."""
        self.join()
        lora_loss = log.get("lora_loss")
        ok = torch.isfinite(loss)
        if torch.is_tensor(lora_loss):
            ok = ok & torch.isfinite(lora_loss)
        if bool(ok):
            return
        if torch.is_tensor(lora_loss) and not bool(torch.isfinite(lora_loss)) and self.scene is not None:
            # the last step was counted, but the fused optimiser skipped it on the device
            raise self.scene.divergence(lora_loss, step=self.scene.steps - 1)
        raise DivergenceError("non-finite loss", step=None)

    # -- interface ------------------------------------------------------------------------------
    def __call__(self, latents: torch.Tensor, embeds, camera: Optional[torch.Tensor], step: int) -> GuidanceOutput:
        """Loss for ``latents`` [B, C, h, w] at update ``step`` (embeds: PromptEmbeds of B views; camera [B, 16])."""
        raise NotImplementedError

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        """Tensors needed to resume (the scene LoRA), empty for SDS."""
        return {} if self.scene is None else self.scene_model.state_tensors()

    def load_state_tensors(self, tensors: Dict[str, torch.Tensor]) -> None:
        if self.scene is not None and tensors:
            self.scene_model.load_state_tensors(tensors)

    def close(self) -> None:
        """Remove the scene LoRA from the shared UNet (restores it exactly as loaded)."""
        if self.scene_model is not None:
            self.scene_model.close()


def make_guidance(denoiser, config: GuidanceConfig, total_updates: int, seed: int = 0) -> Guidance:
    """Build the guidance named by ``config.method`` (a registered method, see :func:`register`)."""
    config.validate()
    return REGISTRY[config.method](denoiser, config, total_updates, seed)
