"""The scene model of variational score distillation: a LoRA of the pretrained UNet that learns the current 3D scene.

ProlificDreamer (Wang et al., NeurIPS 2023, Sec. 3.3 and App. C) estimates the score of the distribution of
renders of the current scene with a LoRA ``eps_phi(x_t, t, y, c)`` of the pretrained UNet, conditioned on the
camera ``c`` (flattened c2w, 16 numbers) through a small MLP added to the timestep embedding, trained on the
renders with the ordinary diffusion loss. threestudio (``stable_diffusion_vsd_guidance.py``) keeps a second
UNet copy for it; here the LoRA is a peft adapter named ``"scene"`` injected into the ONE frozen UNet and switched
on only for scene calls, so the pretrained predictions stay exact and no UNet is copied.

With the LoRA's B matrices zero (peft's default init) and the camera MLP's last layer zero, the scene model equals
the pretrained model at the start (ProlificDreamer initialises the LoRA from the pretrained model too).
"""

from __future__ import annotations

import random
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import DivergenceError, DreamFlowError, check
from .denoiser import Denoiser, PromptEmbeds

ADAPTER_NAME = "scene"


@dataclass
class SceneLoRAConfig:
    """Scene LoRA and its optimiser (defaults: threestudio ``configs/prolificdreamer.yaml`` / VSD guidance)."""

    rank: int = 4
    """LoRA rank r (threestudio VSD: diffusers LoRAAttnProcessor default rank 4)."""
    alpha: float = 4.0
    """LoRA alpha; the update is scaled by alpha / rank (= 1, as diffusers' LoRAAttnProcessor)."""
    target_modules: Tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    """Attention projections that get a LoRA (all self- and cross-attention layers of the UNet; threestudio)."""
    lr: float = 1e-4
    """AdamW learning rate of LoRA + camera MLP (threestudio prolificdreamer ``optimizer.params.guidance.lr``)."""
    betas: Tuple[float, float] = (0.9, 0.99)
    """AdamW betas (threestudio prolificdreamer optimizer)."""
    eps: float = 1e-15
    """AdamW epsilon (threestudio prolificdreamer optimizer)."""
    weight_decay: float = 0.0
    """AdamW weight decay (threestudio)."""
    camera_condition: bool = True
    """Condition the scene model on the camera (ProlificDreamer: c2w through an MLP into the time embedding)."""
    camera_dropout: float = 0.1
    """Probability that a training batch sees a zero camera (ProlificDreamer / threestudio ``lora_cfg_training``)."""
    camera_hidden: Optional[int] = None
    """Hidden width of the camera MLP; None = the UNet's time-embedding width (threestudio TimestepEmbedding(16, 1280))."""
    t_range: Tuple[float, float] = (0.0, 1.0)
    """Range of the uniform random t of ``train_step`` when t is not given (threestudio trains on U[0, 1000))."""

    def validate(self) -> "SceneLoRAConfig":
        check(self.rank >= 1, f"scene LoRA rank {self.rank} must be >= 1")
        check(self.alpha > 0, f"scene LoRA alpha {self.alpha} must be > 0")
        check(self.lr > 0, f"scene LoRA lr {self.lr} must be > 0")
        check(0.0 <= self.camera_dropout <= 1.0, f"camera_dropout {self.camera_dropout} must be in [0, 1]")
        lo, hi = self.t_range
        check(0.0 <= lo <= hi <= 1.0, f"scene LoRA t_range {self.t_range} must satisfy 0 <= low <= high <= 1")
        check(len(self.target_modules) > 0, "scene LoRA target_modules is empty; give e.g. ('to_q', 'to_k', 'to_v', 'to_out.0')")
        return self


def _undo_failed_adapter(unet) -> None:
    """Leave the UNet as loaded after a failed ``add_adapter`` (diffusers marks it as carrying adapters first)."""
    try:
        if getattr(unet, "peft_config", None):
            unet.unload_lora()
    except Exception:
        pass
    if getattr(unet, "_hf_peft_config_loaded", False) and not getattr(unet, "peft_config", None):
        unet._hf_peft_config_loaded = False


class SceneDenoiser(torch.nn.Module):
    """eps_phi: the pretrained UNet + a "scene" LoRA + a camera MLP, trained on renders of the current scene.

    ``self.parameters()`` holds the camera MLP only; :meth:`parameters_to_train` adds the LoRA weights, which
    live inside ``denoiser.unet`` (float32 even when the UNet is float16).
    """

    def __init__(self, denoiser: Denoiser, config: SceneLoRAConfig = SceneLoRAConfig(), seed: int = 0):
        super().__init__()
        from peft import LoraConfig
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.denoiser = denoiser
        self.config = config.validate()
        unet = denoiser.unet
        if ADAPTER_NAME in (getattr(unet, "peft_config", None) or {}):
            raise DreamFlowError("this denoiser's UNet already carries a scene LoRA; call remove() on the old "
                                 "SceneDenoiser first or load the denoiser again")
        device = denoiser.device
        forks = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=forks):
            torch.manual_seed(seed)
            # peft default init: A Kaiming-uniform, B zero -> the adapter starts as an exact no-op.
            try:
                unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha,
                                            target_modules=list(config.target_modules), init_lora_weights=True),
                                 adapter_name=ADAPTER_NAME)
            except Exception as e:
                _undo_failed_adapter(unet)
                raise DreamFlowError(f"scene LoRA could not be added to the UNet ({type(e).__name__}: "
                                     f"{str(e).splitlines()[0][:160]}); use attention projection names such as "
                                     f"to_q, to_k, to_v, to_out.0 as target_modules") from None
            temb = unet.time_embedding.linear_2.out_features
            self.camera_mlp: Optional[torch.nn.Sequential] = None
            if config.camera_condition:
                hidden = config.camera_hidden or temb
                self.camera_mlp = torch.nn.Sequential(torch.nn.Linear(16, hidden), torch.nn.SiLU(),
                                                      torch.nn.Linear(hidden, temb)).to(device=device, dtype=torch.float32)
                torch.nn.init.zeros_(self.camera_mlp[2].weight)
                torch.nn.init.zeros_(self.camera_mlp[2].bias)
        self._lora_layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        if not self._lora_layers:
            raise DreamFlowError(f"scene LoRA target_modules {config.target_modules} match no layer of the UNet; use "
                                 f"attention projection names such as to_q, to_k, to_v, to_out.0")
        self._lora: Dict[str, torch.nn.Parameter] = {}
        for name, p in unet.named_parameters():
            if "lora_" in name and f".{ADAPTER_NAME}." in name:
                # float32 LoRA on a float16 UNet: peft casts the layer input to the LoRA dtype and the sum back.
                p.data = p.data.to(torch.float32)
                p.requires_grad_(True)
                self._lora[name] = p
        self._on = True
        self._set_adapter(False)
        self.optimizer = torch.optim.AdamW(self.parameters_to_train(), lr=config.lr, betas=config.betas, eps=config.eps,
                                           weight_decay=config.weight_decay)
        self.steps = 0
        self._removed = False
        #: Graphed twins of :meth:`eager_eps` / :meth:`eager_output` (same signature and result), installed by the
        #: denoiser's fast path (``FastPath.accelerate``); None = eager.
        self.graphed_eps = None
        self.graphed_output = None

    # ------------------------------------------------------------------ switching
    def _set_adapter(self, on: bool) -> None:
        if on == self._on:
            return
        for m in self._lora_layers:
            m.enable_adapters(on)
        # peft's enable_adapters(False) also freezes the adapter; the optimiser owns these, keep them trainable.
        for p in self._lora.values():
            p.requires_grad_(True)
        self._on = on

    @contextmanager
    def adapter(self, on: bool) -> Iterator[None]:
        """Switch the scene LoRA on/off inside the block (no UNet copy); restores the previous state after."""
        self._check_alive()
        prev = self._on
        self._set_adapter(on)
        try:
            yield
        finally:
            self._set_adapter(prev)

    def _camera_embedding(self, camera: Optional[torch.Tensor], batch: int) -> Optional[torch.Tensor]:
        if not self.config.camera_condition or camera is None:
            return None
        camera = camera.reshape(camera.shape[0], -1) if camera.ndim == 3 else camera
        if camera.ndim != 2 or camera.shape[1] != 16 or camera.shape[0] not in (1, batch):
            raise DreamFlowError(f"camera condition must be [B, 16] (flattened c2w, Cameras.condition()) for B = "
                                 f"{batch}, got {tuple(camera.shape)}")
        return self.camera_mlp(camera.to(self.denoiser.device, torch.float32))

    def backward_scope(self):
        """The context a backward through the scene model runs in. With the UNet's gradient checkpointing
        (``Denoiser.unet_checkpointing``, the low_vram preset) the backward recomputes the UNet blocks' forward, so
        the LoRA must be on then as it was in the forward (autocast is restored by the checkpoint itself; the
        camera embedding enters the blocks as an input, so its hook is not needed); otherwise nothing."""
        if getattr(self.denoiser, "unet_checkpointing", False):
            return self.adapter(True)
        return nullcontext()

    @contextmanager
    def _scene_call(self, camera: Optional[torch.Tensor], batch: int) -> Iterator[None]:
        """Adapter on + camera embedding added to the UNet time embedding (a hook that exists only here)."""
        emb = self._camera_embedding(camera, batch)
        handle = None
        if emb is not None:
            handle = self.denoiser.unet.time_embedding.register_forward_hook(
                lambda _m, _inp, out: out + emb.to(out.dtype))
        dev = self.denoiser.device
        amp = (torch.autocast(device_type="cuda", dtype=self.denoiser.dtype)
               if dev.type == "cuda" and self.denoiser.dtype != torch.float32 else nullcontext())
        try:
            with self.adapter(True), amp:
                yield
        finally:
            if handle is not None:
                handle.remove()

    # ------------------------------------------------------------------ use
    def output(self, x_t: torch.Tensor, t, embeds: PromptEmbeds, camera: Optional[torch.Tensor]) -> torch.Tensor:
        """Raw scene-model UNet output (eps or v, as the pretrained model), conditional branch only: from the fast
        path's graphs when installed (``graphed_output``), else :meth:`eager_output`."""
        if self.graphed_output is not None:
            return self.graphed_output(x_t, t, embeds, camera)
        return self.eager_output(x_t, t, embeds, camera)

    def eager_output(self, x_t: torch.Tensor, t, embeds: PromptEmbeds, camera: Optional[torch.Tensor]) -> torch.Tensor:
        """:meth:`output`, run eagerly."""
        self._check_alive()
        with self._scene_call(camera, x_t.shape[0]):
            return self.denoiser.unet_output(x_t, t, embeds, cond=True)

    def eps(self, x_t: torch.Tensor, t, embeds: PromptEmbeds, camera: Optional[torch.Tensor]) -> torch.Tensor:
        """eps_phi(x_t, t, y, c): scene-model noise prediction, [B, C, h, w] in ``x_t.dtype``.

        Args:
            x_t: noisy latents [B, C, h, w].
            t: continuous time in [0, 1], scalar or [B].
            embeds: prompt embeddings (only ``cond`` is used).
            camera: [B, 16] flattened c2w (``Cameras.condition()``), or None for the unconditional camera (zeros
                are what training dropout shows; None skips the embedding, which is the same at init).

        From the fast path's graphs when installed (``graphed_eps``), else :meth:`eager_eps`.
        """
        if self.graphed_eps is not None:
            return self.graphed_eps(x_t, t, embeds, camera)
        return self.eager_eps(x_t, t, embeds, camera)

    def eager_eps(self, x_t: torch.Tensor, t, embeds: PromptEmbeds, camera: Optional[torch.Tensor]) -> torch.Tensor:
        """:meth:`eps`, run eagerly (its UNet call goes through :meth:`output`)."""
        out = self.output(x_t, t, embeds, camera)
        return self.denoiser.eps_from_output(out, x_t, t)

    def train_step(self, x0: torch.Tensor, embeds: PromptEmbeds, camera: Optional[torch.Tensor],
                   t: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                   noise: Optional[torch.Tensor] = None, defer_check: bool = False) -> torch.Tensor:
        """One AdamW step on || output(x_t, t) - target ||^2, target = noise (eps models) or v (v-prediction):
        ``begin_step(...).finish(defer_check)``.

        Host syncs: exactly one, the finiteness check of the loss, made after the backward is queued (the
        dropout coin is applied on the device and the loss is returned as a tensor); none with ``defer_check``
        and a fused optimiser.

        Args:
            x0: clean latents of the current renders [B, C, h, w]; detached (the scene model must not push
                gradients into the 3D scene).
            embeds: prompt embeddings (``cond`` used).
            camera: [B, 16] or None; replaced by zeros for the whole batch with probability ``camera_dropout``.
            t: [B] or scalar in [0, 1]; default U(t_range) per view.
            generator: draws t, the noise and the dropout coin (a fixed generator seed gives a fixed batch).
            noise: explicit eps [B, C, h, w] (default: drawn from ``generator``).
            defer_check: with a fused AdamW (the fast path's), make no host sync at all: a non-finite loss skips
                the optimiser step on the device (AdamW's ``found_inf``, as GradScaler uses it) and the caller
                checks the returned loss (the stage loop does, in its one check per update; see
                :meth:`divergence`). Other optimisers check here as usual.

        Returns:
            the loss before the step: a detached 0-dim float32 tensor on the denoiser's device.
        Raises:
            DivergenceError when the loss is not finite; the LoRA and camera-MLP weights are then left as
            they were (no optimiser step) and their gradients cleared.
        """
        return self.begin_step(x0, embeds, camera, t=t, generator=generator, noise=noise).finish(defer_check)

    def begin_step(self, x0: torch.Tensor, embeds: PromptEmbeds, camera: Optional[torch.Tensor],
                   t: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                   noise: Optional[torch.Tensor] = None) -> "LoRAStep":
        """The first half of :meth:`train_step` (same arguments): draw t, the noise and the dropout coin, run the
        scene model's forward with autograd. The returned :class:`LoRAStep` holds the prediction, so a caller
        that needs ``eps_phi`` at these very noisy latents (APFO with ``GuidanceConfig.lora_shares_noise``) reads
        ``step.eps`` instead of running the UNet again, then calls ``step.finish()`` for the backward and the
        optimiser step. No host sync."""
        self._check_alive()
        d = self.denoiser
        nb = d.device.type == "cuda"  # host -> device copies need no sync (pageable memory is staged first)
        x0 = x0.detach().to(d.device, torch.float32, non_blocking=nb)
        B = x0.shape[0]
        gdev = generator.device if generator is not None else d.device
        if t is None:
            lo, hi = self.config.t_range
            t = lo + (hi - lo) * torch.rand(B, generator=generator, device=gdev)
        t = d._t(torch.as_tensor(t).to(d.device, non_blocking=nb), B)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=gdev)
        noise = noise.to(d.device, torch.float32, non_blocking=nb)
        if camera is not None and self.config.camera_condition and self.config.camera_dropout > 0:
            if generator is not None:
                # The coin stays on its generator's device and the choice is made there: no host sync.
                coin = torch.rand((), generator=generator, device=gdev)
                drop = (coin < self.config.camera_dropout).to(camera.device, non_blocking=camera.is_cuda)
                camera = torch.where(drop, torch.zeros_like(camera), camera)
            elif random.random() < self.config.camera_dropout:  # a host draw: no sync either
                camera = torch.zeros_like(camera)
        x_t = d.add_noise(x0, noise, t)
        target = d.target(x0, noise, t)
        with torch.enable_grad():
            out = self.output(x_t, t, embeds, camera)
            loss = F.mse_loss(out.float(), target.float())
        return LoRAStep(self, loss, d.eps_from_output(out.detach(), x_t, t).float())

    def _finish(self, loss: torch.Tensor, defer_check: bool) -> torch.Tensor:
        """Backward and optimiser step of a :class:`LoRAStep` (see :meth:`train_step`)."""
        self._check_alive()
        self.optimizer.zero_grad(set_to_none=True)
        # Queue the backward before the one host sync of the step (the finiteness check), so the GPU is
        # busy with it while the host waits; the step itself only runs on a finite loss.
        with self.backward_scope():
            loss.backward()
        on_device = defer_check and self.optimizer.defaults.get("fused")
        if on_device:  # 1: the fused kernel skips the step
            self.optimizer.found_inf = (~torch.isfinite(loss.detach())).float()
        elif not bool(torch.isfinite(loss)):
            self.optimizer.zero_grad(set_to_none=True)
            raise self.divergence(loss)
        try:
            self.optimizer.step()
        finally:
            if on_device:
                self.optimizer.found_inf = None
        self.steps += 1
        return loss.detach()

    def divergence(self, loss: torch.Tensor, step: Optional[int] = None) -> DivergenceError:
        """The error for a non-finite LoRA loss at LoRA step ``step`` (default: the next one), raised by
        :meth:`train_step` or by a caller that deferred the check."""
        step = self.steps if step is None else step
        return DivergenceError(f"scene LoRA loss is {float(loss.detach())} at LoRA step {step}; lower the scene LoRA lr "
                               f"({self.config.lr}) or use float32/bf16", step=step)

    def parameters_to_train(self) -> List[torch.nn.Parameter]:
        """LoRA weights (inside the UNet) + camera MLP weights."""
        params = list(self._lora.values())
        if self.camera_mlp is not None:
            params += list(self.camera_mlp.parameters())
        return params

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> Dict[str, torch.Tensor]:
        """Detached CPU copies: ``lora.<peft parameter name>`` and ``camera_mlp.<name>``."""
        self._check_alive()
        out = {f"lora.{k}": v.detach().to("cpu", copy=True) for k, v in self._lora.items()}
        if self.camera_mlp is not None:
            out.update({f"camera_mlp.{k}": v.detach().to("cpu", copy=True) for k, v in self.camera_mlp.state_dict().items()})
        return out

    def load_state_tensors(self, d: Dict[str, torch.Tensor]) -> None:
        """Load what :meth:`state_tensors` returned (same rank / targets / camera settings, else a clear error)."""
        self._check_alive()
        own = {f"lora.{k}": v for k, v in self._lora.items()}
        if self.camera_mlp is not None:
            own.update({f"camera_mlp.{k}": v for k, v in self.camera_mlp.state_dict(keep_vars=True).items()})
        missing, extra = sorted(set(own) - set(d)), sorted(set(d) - set(own))
        bad = sorted(k for k in set(own) & set(d) if tuple(own[k].shape) != tuple(d[k].shape))
        if missing or extra or bad:
            raise DreamFlowError(f"scene LoRA state does not match this SceneDenoiser (missing {missing[:2]}, "
                                 f"unexpected {extra[:2]}, shape mismatch {bad[:2]}); use the same LoRA rank, targets "
                                 f"and camera settings as when it was saved")
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(d[k].to(p.device, p.dtype))

    def remove(self) -> None:
        """Delete the adapter (and any hook), leaving ``denoiser.unet`` exactly as loaded."""
        if self._removed:
            return
        unet = self.denoiser.unet
        self._set_adapter(False)
        others = [n for n in (getattr(unet, "peft_config", None) or {}) if n != ADAPTER_NAME]
        if others:
            unet.delete_adapters(ADAPTER_NAME)
        else:
            # Unwraps every peft layer back to its original nn.Linear (diffusers recurse_remove_peft_layers).
            unet.unload_lora()
        self._lora.clear()
        self._lora_layers = []
        self.optimizer = None
        self._removed = True

    def _check_alive(self) -> None:
        if self._removed:
            raise DreamFlowError("this SceneDenoiser was removed; create a new one")


class LoRAStep:
    """One scene-LoRA training step between its forward and its backward (:meth:`SceneDenoiser.begin_step`).

    Attributes:
        eps: eps_phi(x_t, t, y, c) of the forward, detached, float32 [B, C, h, w]: the scene model's prediction
            before this step's update, under the step's camera (zeros when the dropout coin fell).
    """

    def __init__(self, scene: SceneDenoiser, loss: torch.Tensor, eps: torch.Tensor):
        self.scene, self._loss, self.eps = scene, loss, eps

    def finish(self, defer_check: bool = False) -> torch.Tensor:
        """Backward + AdamW step; returns the loss (see :meth:`SceneDenoiser.train_step`). Once only."""
        check(self._loss is not None, "this LoRA step was already finished; begin a new one")
        loss, self._loss = self._loss, None
        return self.scene._finish(loss, defer_check)
