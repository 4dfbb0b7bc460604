"""CUDA fast paths for the denoiser calls of a stage: CUDA-graph replay and a fused LoRA optimiser (opt-in).

Why: an SD 2.1 UNet call is well over a thousand kernel launches (bench/RESULTS.md, "Figures moved from
docstrings"), and the peft-wrapped scene model adds several per attention projection. Run eagerly, Python and the
dispatcher spend longer launching them than the GPU needs to run them at a stage's batch sizes. A CUDA graph records
the launches once per input shape and replays them with one call (eager vs replayed timings of each call:
bench/RESULTS.md, "Pieces" of each run).

What is replayed (pure functions of their inputs and of weights read in place, so a replay computes what the
eager call computes, with the same kernels on the same inputs; measured bit-identical):

* the pretrained model's UNet call of :meth:`Denoiser.predict_eps` (the classifier-free-guidance batch of
  2B, ``[uncond, cond]``), hooked in through ``Denoiser.fast_path``;
* the scene model's prediction ``SceneDenoiser.eps`` (scene LoRA on, camera MLP, autocast);
* the forward and backward of ``SceneDenoiser.output`` inside ``SceneDenoiser.train_step`` (as
  ``torch.cuda.make_graphed_callables`` does); the step's random draws, loss, finiteness check and optimiser
  step stay eager in ``train_step``, whose optimiser becomes the fused AdamW.

The last two are installed on a scene LoRA by :meth:`FastPath.accelerate`, which the guidance's
:class:`~dreamflow.denoisers.scene_model.SceneModel` calls when it is built on a denoiser with a fast path (that
object also owns the overlapped LoRA stream and its join). LoRA and camera-MLP weights change every update; the
graphs read them in place.

Modules by job: ``graphs.py`` (capture, replay, caches, the scene model's graphed calls), ``compiled.py``
(``torch.compile`` of the repeated blocks), ``attention.py`` (the VAE's matmul attention); this file holds the
settings and :class:`FastPath`, which puts them together for one denoiser.

Graph safety: static input buffers live outside the graphs' memory pool and are filled with ``copy_`` (which
casts exactly like the eager ``.to(dtype)``); outputs are copied out right after each replay, so the no-grad
graphs of one denoiser share one memory pool (the training graphs have their own: saved activations live
from a forward replay to its backward). Two graphs never replay side by side with a shared pool: the
overlapped LoRA step (FastPathConfig.overlap_lora) replays only the training graphs on its stream, and every
graph has a capture stream of its own (see ``_capture_stream_note``). Nothing inside a captured call
synchronises with the host. A call falls
back to the eager path (same result) whenever a graph would not be the same function: a scene LoRA enabled on
the UNet, a forward hook on its time embedding, autocast active, inputs that need gradients, a stream capture
in progress, or non-CUDA tensors. Graphs are recaptured when the UNet's weights move (``unload()``, ``.to``).

Usage::

    denoiser = Denoiser.load("sd21-base", device="cuda")      # float16
    denoiser.enable_fast_path()                                # FastPathConfig() defaults
    run_nerf_stage(denoiser, prompt, config=...)               # the pretrained calls and the scene model use it
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from ..errors import DreamFlowError, check
from .attention import MatmulAttention, use_matmul_attention
from .compiled import COMPILE_MODES, COMPILED_BLOCKS, compile_blocks, uncompile
from .graphs import GraphedSceneEps, GraphedSceneOutput, _GraphCache, _Graph, _graphable, _LoRAWatch, _signature

__all__ = ["COMPILED_BLOCKS", "COMPILE_MODES", "FastPath", "FastPathConfig", "MatmulAttention", "compile_blocks",
           "uncompile", "use_fused_adamw", "use_matmul_attention"]

Tensor = torch.Tensor


@dataclass
class FastPathConfig:
    """Which fast paths to use (all default on; each keeps the eager path's results up to float rounding)."""

    cuda_graphs: bool = True
    """Replay the pretrained CFG UNet call from a CUDA graph per input shape (its launches otherwise cost more
    than its kernels at a stage's batch; bench/RESULTS.md, "Pieces" of each run)."""
    graph_scene_eps: bool = True
    """Replay the scene LoRA's prediction (APFO / VSD) from CUDA graphs too (ours)."""
    graph_lora_step: bool = True
    """Replay the forward and backward of the scene LoRA's training step from CUDA graphs (the step's
    randomness, loss, finiteness check and optimiser step stay eager, in SceneDenoiser.train_step)."""
    fused_optimizer: bool = True
    """Use ``torch.optim.AdamW(fused=True)`` for the scene LoRA (same update rule, one kernel for all tensors)."""
    overlap_lora: bool = True
    """Queue the scene LoRA's training steps on a second CUDA stream, so they run alongside the scene's backward
    (they share no tensors until the next update's scene prediction, which waits for them; SceneModel.join)."""
    vae_matmul_attention: bool = True
    """Run the VAE's self-attention (one head of width 512 in the SD / SDXL VAEs' mid-blocks) as cuBLAS matmuls and a
    softmax (:class:`MatmulAttention`) instead of SDPA: SDPA has no flash kernel for width 512, and the
    memory-efficient kernel's backward dominated the refiner's encode + backward (bench/RESULTS.md, run 4; stage
    updates with it: run 6). bfloat16 / float32 VAEs compute it in their dtype, float16 VAEs (SD 2.1) in bfloat16:
    float16's range underflows the attention's small backward gradients (a CPU check on the real SD 2.1 VAE
    architecture: a larger image-gradient error with float16 maths, bench/RESULTS.md, "Figures moved from
    docstrings") and was slower. Costs one [B, N, N] attention matrix per call."""
    compile: str = "blocks"
    """``torch.compile`` (default mode, static shapes) under the graphs: "blocks" compiles the UNet's repeated
    blocks (ResnetBlock2D, BasicTransformerBlock; regional compilation: each block class compiles once per
    shape and is shared by its instances), "unet" the whole UNet, "off" none. Fuses GroupNorm + SiLU, residual adds
    and attention's reshapes; "blocks" gets most of "unet"'s gain at a fraction of its compile time
    (bench/RESULTS.md, run 3). The first use of a model in a process compiles for minutes on a cold cache; the
    kernels are kept in ~/.cache/dreamflow/torchinductor (dreamflow/compile_cache.py), so later processes start
    much sooner (run 6, "Cold compile")."""
    compile_vae: bool = True
    """With ``compile`` on, also compile the VAE encoder's ResnetBlock2D blocks (the stages differentiate
    through the encoder every update; its GroupNorm + SiLU forward and backward are memory-bound in eager
    mode; bench/RESULTS.md, run 3). Skipped with ``cpu_offload`` (the VAE then moves between the CPU and the GPU
    around each stage; compiled blocks were not measured that way)."""
    warmup_calls: int = 2
    """Eager calls on the capture stream before each capture (lazy cuBLAS / cuDNN set-up must not be captured;
    PyTorch's CUDA-graph notes use 3; 2 sufficed in every GPU run)."""
    max_graphs: int = 8
    """Captured shapes kept per call site; the least recently used one is dropped beyond this (each holds
    its output and shares the activation pool)."""

    def validate(self) -> "FastPathConfig":
        check(self.warmup_calls >= 1, f"fast path warmup_calls={self.warmup_calls} must be >= 1 (2 is usual)")
        check(self.max_graphs >= 1, f"fast path max_graphs={self.max_graphs} must be >= 1 (8 is usual)")
        check(self.compile in COMPILE_MODES, f"fast path compile='{self.compile}' is unknown; use one of: "
              f"{', '.join(COMPILE_MODES)}")
        return self


# --------------------------------------------------------------------------------------------
# The fast path of one denoiser
# --------------------------------------------------------------------------------------------
class FastPath:
    """CUDA fast path of one :class:`~dreamflow.denoisers.Denoiser` (create with ``Denoiser.enable_fast_path``).

    Attributes:
        config: the :class:`FastPathConfig`.
        stats(): captures / replays / eager fallbacks so far (benchmarks and tests read it).
    """

    def __init__(self, denoiser, config: Optional[FastPathConfig] = None):
        self.config = (config or FastPathConfig()).validate()
        if denoiser.device.type != "cuda" or not torch.cuda.is_available():
            raise DreamFlowError(f"the fast path (CUDA graphs, fused AdamW) needs a CUDA denoiser, but "
                                 f"'{denoiser.name}' runs on {denoiser.device}; load it with device='cuda' or "
                                 f"leave the fast path off")
        self.denoiser = denoiser
        self.pool = torch.cuda.graph_pool_handle()
        self._unet_graphs = _GraphCache(self.config.max_graphs)
        self._caches: "weakref.WeakSet[_GraphCache]" = weakref.WeakSet([self._unet_graphs])
        self._lora = _LoRAWatch(denoiser.unet)
        self._weights = self._weights_key()
        self.fallbacks = 0
        self.compiled = compile_blocks(denoiser.unet, self.config.compile)
        if self.config.compile != "off" and self.config.compile_vae and not denoiser.cpu_offload:
            self.compiled += compile_blocks(denoiser.vae.encoder, "blocks", blocks=("ResnetBlock2D",))
        self._vae_attention = (use_matmul_attention(denoiser.vae, torch.bfloat16 if denoiser.vae_dtype == torch.float16
                                                    else None) if self.config.vae_matmul_attention else [])

    def close(self) -> None:
        """Drop the graphs, undo the compilation and the VAE attention switch (``Denoiser.disable_fast_path``)."""
        self.clear()
        uncompile(self.compiled)
        self.compiled = []
        for module, processor in self._vae_attention:
            module.set_processor(processor)
        self._vae_attention = []

    # ------------------------------------------------------------------ bookkeeping
    def _weights_key(self) -> Tuple:
        unet = self.denoiser.unet
        if unet is None:
            return (None,)
        w_in, w_out = unet.conv_in.weight, unet.conv_out.weight
        return id(unet), w_in.data_ptr(), w_out.data_ptr(), w_in.device, w_in.dtype

    def _weights_unchanged(self) -> bool:
        key = self._weights_key()
        if key != self._weights:  # moved, cast or replaced: captured addresses are stale
            self.clear()
            self._lora = _LoRAWatch(self.denoiser.unet)
            self._weights = key
        return key[0] is not None and key[3].type == "cuda"

    def stats(self) -> Dict[str, int]:
        return {"unet_captures": self._unet_graphs.captures, "unet_replays": self._unet_graphs.replays,
                "fallbacks": self.fallbacks}

    def clear(self) -> None:
        """Drop every captured graph, the scene models' too (they are recaptured on the next call)."""
        for cache in list(self._caches):
            cache.clear()

    # ------------------------------------------------------------------ pretrained UNet
    def unet(self, x_t: Tensor, t: Tensor, hidden: Tensor, added: Optional[dict]) -> Optional[Tensor]:
        """The pretrained UNet output for ``Denoiser._run_unet``'s arguments, replayed; None = run eagerly.

        Args:
            x_t: [N, C, h, w] latents (any float dtype); t: [N] float32 continuous time in [0, 1];
            hidden: [N, 77, D]; added: refiner ``{"text_embeds": [N, P], "time_ids": [N, 5]}`` or None.
        Returns:
            [N, C, h, w] in ``x_t.dtype`` (a fresh tensor), or None when the eager call must run.
        """
        d = self.denoiser
        if not self.config.cuda_graphs:
            return None
        added = added or {}
        tensors = [x_t, t, hidden, *added.values()]
        if (not _graphable(tensors) or not self._weights_unchanged() or t.dtype != torch.float32
                or hidden.shape[-1] != d.unet.config.cross_attention_dim or self._lora.any_enabled()
                or d.unet.time_embedding._forward_hooks or d.unet.time_embedding._forward_pre_hooks):
            self.fallbacks += 1
            return None
        inputs = {"x": x_t, "t": t, "hidden": hidden, **added}
        # Static buffers in the dtypes the eager call casts to (Denoiser._run_unet / _added_cond); t stays float32.
        dtypes = {k: d.dtype for k in inputs if k != "t"}
        unet, T = d.unet, d.num_train_timesteps

        def call(x, t, hidden, **extra):
            return unet(x, t * (T - 1), encoder_hidden_states=hidden, added_cond_kwargs=extra or None,
                        return_dict=False)[0]

        out = self._unet_graphs.run(_signature(inputs), lambda: _Graph(call, inputs, dtypes, self.pool,
                                                                            self.config.warmup_calls), inputs)
        if out is None:
            self.fallbacks += 1
            return None
        return out.to(x_t.dtype, copy=True)

    # ------------------------------------------------------------------ scene model
    def accelerate(self, scene) -> None:
        """Speed up a scene LoRA (``SceneModel`` calls it when built on a denoiser with a fast path): fused AdamW,
        graphed ``eps`` and training forward / backward (SceneDenoiser.graphed_eps / graphed_output)."""
        if self.config.fused_optimizer:
            use_fused_adamw(scene)
        if self.config.graph_scene_eps and scene.graphed_eps is None:
            scene.graphed_eps = GraphedSceneEps(scene, self)
        if self.config.graph_lora_step and scene.graphed_output is None:
            scene.graphed_output = GraphedSceneOutput(scene, self)


def use_fused_adamw(scene) -> bool:
    """Replace a fresh scene-LoRA AdamW by ``AdamW(fused=True)`` with the same hyper-parameters.

    Returns True if replaced (False: not AdamW, already stepped, or parameters not all on CUDA).
    """
    opt = scene.optimizer
    params = scene.parameters_to_train()
    if (type(opt) is not torch.optim.AdamW or opt.state or opt.defaults.get("fused")
            or not all(p.is_cuda and p.dtype in (torch.float16, torch.bfloat16, torch.float32) for p in params)):
        return False
    d = opt.defaults
    scene.optimizer = torch.optim.AdamW(params, lr=d["lr"], betas=d["betas"], eps=d["eps"],
                                        weight_decay=d["weight_decay"], amsgrad=d["amsgrad"], fused=True)
    return True
