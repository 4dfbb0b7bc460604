"""The scene model as guidance sees it: ``eps()`` and ``step()``, behind one door.

:class:`SceneModel` owns a :class:`~dreamflow.denoisers.scene.SceneDenoiser` (the scene LoRA + camera MLP) and how
it runs: eagerly, from CUDA graphs (the denoiser's fast path: graphed ``eps`` and training forward / backward, fused
AdamW; ``fast.py``), and with the LoRA's training steps overlapped on a second CUDA stream
(``FastPathConfig.overlap_lora``), including the join that orders later readers of the LoRA after those steps.
Guidance code asks for a prediction and a training step and never sees a stream::

    model = SceneModel(denoiser, SceneLoRAConfig(), seed=1)
    eps_phi = model.eps(x_t, t, embeds, camera)                       # joins the last update's steps first
    lora_loss = model.step(x, embeds, camera, t, generator, steps=1)  # queued (overlapped) LoRA steps

APFO's ``lora_shares_noise``: ``model.eps(..., share=(x, noise, generator))`` runs the first LoRA step's forward at
these noisy latents and returns its prediction; the next ``step()`` finishes that step as its first one.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Dict, Optional

import torch

from .scene import SceneDenoiser, SceneLoRAConfig


class SceneModel:
    """eps_phi for guidance: eager, graphed or overlapped execution of the scene LoRA, and its join.

    Attributes:
        net: the :class:`SceneDenoiser` (None after :meth:`close`).
    """

    def __init__(self, denoiser, config: SceneLoRAConfig, seed: int = 0):
        self.denoiser = denoiser
        self.net: Optional[SceneDenoiser] = SceneDenoiser(denoiser, config, seed=seed)
        self._side: Optional["torch.cuda.Stream"] = None
        self._pending = False
        self._begun = None  # a shared LoRA step whose forward ran in eps(share=...), finished by step()
        fast = getattr(denoiser, "fast_path", None)
        if fast is not None:  # opt-in CUDA fast path (Denoiser.enable_fast_path): graphs, fused AdamW
            fast.accelerate(self.net)

    # ------------------------------------------------------------------ streams
    def _stream(self, x: torch.Tensor) -> Optional["torch.cuda.Stream"]:
        """The CUDA stream the LoRA steps run on when the fast path overlaps them (FastPathConfig.overlap_lora)."""
        fast = getattr(self.denoiser, "fast_path", None)
        if fast is None or not fast.config.overlap_lora or not x.is_cuda:
            return None
        if self._side is None:
            self._side = torch.cuda.Stream(x.device)
        return self._side

    def _to_side(self, x: torch.Tensor, extra=()) -> Optional["torch.cuda.Stream"]:
        """The LoRA stream after the main stream's work so far (None without overlap); the tensors it will read
        are marked as used there (the main stream may free them while the LoRA still reads them)."""
        side = self._stream(x)
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(x.device))
            for tensor in (x, *extra):
                if torch.is_tensor(tensor) and tensor.is_cuda:
                    tensor.record_stream(side)
        return side

    def _take(self, step) -> torch.Tensor:
        """``step.eps`` for the main stream (which waits for the LoRA stream's forward when there is one)."""
        if self._side is not None and step.eps.is_cuda:
            main = torch.cuda.current_stream(step.eps.device)
            main.wait_stream(self._side)
            step.eps.record_stream(main)
        return step.eps

    def join(self) -> None:
        """Order the current stream after the LoRA steps queued on the side stream (no host sync). Every reader of
        the LoRA joins first: :meth:`eps`, and through the guidance the finiteness check, the state and close."""
        if self._pending:
            torch.cuda.current_stream(self._side.device).wait_stream(self._side)
            self._pending = False

    # ------------------------------------------------------------------ the door
    def eps(self, x_t: torch.Tensor, t: torch.Tensor, embeds, camera: Optional[torch.Tensor], share=None) -> torch.Tensor:
        """eps_phi(x_t, t, y, c), float32, no grad (the scene model's prediction, after the last update's steps).

        ``share=(x, noise, generator)``: APFO's ``lora_shares_noise``; ``x_t`` is ``x`` noised with ``noise`` at
        ``t``. The first LoRA step's forward (a :class:`~dreamflow.denoisers.scene.LoRAStep`) runs at these very
        noisy latents, on the LoRA stream when the fast path overlaps (autograd runs a backward on its forward's
        stream: the step's backward then overlaps the scene's), and its prediction is returned; the main stream
        waits for that forward (two CUDA-graph replays side by side, the LoRA's forward graph and a CFG graph,
        hung the GPU in bench/RESULTS.md run 5). The next :meth:`step` finishes it."""
        self.join()
        if share is None:
            with torch.no_grad():
                return self.net.eps(x_t, t, embeds, camera).float()
        x, noise, generator = share
        side = self._to_side(x, (noise, t, camera, *vars(embeds).values()))
        with (torch.cuda.stream(side) if side is not None else nullcontext()):
            self._begun = self.net.begin_step(x.detach(), embeds, camera, t=t, generator=generator, noise=noise)
        return self._take(self._begun)

    def step(self, x: torch.Tensor, embeds, camera: Optional[torch.Tensor], t: Optional[torch.Tensor],
             generator: Optional[torch.Generator], steps: int = 1) -> Optional[torch.Tensor]:
        """``steps`` LoRA training steps on the detached ``x``; returns the last loss, or the first non-finite one
        (None for 0 steps). A step begun by ``eps(share=...)`` is finished as the first one.

        With a fused optimiser the steps make no host sync (``defer_check``): the guidance's ``check_finite``
        then does it. With the fast path's ``overlap_lora`` the steps are queued on a second CUDA stream: they
        read only the detached latents and write only the LoRA, so the GPU runs them alongside the scene's
        backward (the render and VAE gradients); :meth:`join` orders later readers after them."""
        begun, self._begun = self._begun, None
        side = self._to_side(x, (t, camera, *vars(embeds).values()))
        loss = None
        with (torch.cuda.stream(side) if side is not None else nullcontext()):
            for i in range(steps):
                if i == 0 and begun is not None:
                    step_loss = begun.finish(defer_check=True)
                else:
                    step_loss = self.net.train_step(x.detach(), embeds, camera, t=t, generator=generator,
                                                    defer_check=True)
                loss = step_loss if loss is None else torch.where(torch.isfinite(loss), step_loss, loss)
        if side is not None:
            if loss is not None:
                loss.record_stream(torch.cuda.current_stream(x.device))
            self._pending = True
        return loss

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> Dict[str, torch.Tensor]:
        self.join()
        return self.net.state_tensors()

    def load_state_tensors(self, tensors: Dict[str, torch.Tensor]) -> None:
        self.join()
        self.net.load_state_tensors(tensors)

    def close(self) -> None:
        """Remove the scene LoRA from the shared UNet (restores it exactly as loaded)."""
        self.join()
        self._begun = None
        if self.net is not None:
            self.net.remove()
            self.net = None
