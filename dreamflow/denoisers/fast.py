"""CUDA fast paths for the denoiser calls of a stage: CUDA-graph replay and a fused LoRA optimiser (opt-in).

Why: an SD 2.1 UNet call is ~1,500 kernel launches, and the peft-wrapped scene model adds several per attention
projection. Run eagerly, Python and the dispatcher spend longer launching them than an H100 needs to run them at
a stage's batch sizes. Measured on an H100 (bench/RESULTS.md): SD 2.1 CFG call 35-47 ms eager vs 26 ms replayed,
scene-LoRA prediction 95-110 vs 23 ms, LoRA training step 170-185 vs 56 ms. A CUDA graph records the launches
once per input shape and replays them with one call.

What is replayed (pure functions of their inputs and of weights read in place, so a replay computes what the
eager call computes, with the same kernels on the same inputs; measured bit-identical):

* the pretrained model's UNet call of :meth:`Denoiser.predict_eps` (the classifier-free-guidance batch of
  2B, ``[uncond, cond]``), hooked in through ``Denoiser.fast_path``;
* the scene model's prediction ``SceneDenoiser.eps`` (scene LoRA on, camera MLP, autocast);
* the forward and backward of ``SceneDenoiser.output`` inside ``SceneDenoiser.train_step`` (as
  ``torch.cuda.make_graphed_callables`` does); the step's random draws, loss, finiteness check and optimiser
  step stay eager in ``train_step``, whose optimiser becomes the fused AdamW.

The last two are installed on a guidance's scene model by :meth:`FastPath.prepare_guidance` (stages/loop.py
calls it). LoRA and camera-MLP weights change every update; the graphs read them in place.

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
    run_nerf_stage(denoiser, prompt, config=...)               # stages pick it up through stages/loop.py
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..errors import DreamFlowError, check

log = logging.getLogger("dreamflow")

Tensor = torch.Tensor


@dataclass
class FastPathConfig:
    """Which fast paths to use (all default on; each keeps the eager path's results up to float rounding)."""

    cuda_graphs: bool = True
    """Replay the pretrained CFG UNet call from a CUDA graph per input shape (measured on an H100: SD 2.1,
    8 x 64 x 64 latents, see bench/RESULTS.md)."""
    graph_scene_eps: bool = True
    """Replay the scene LoRA's prediction (APFO / VSD) from CUDA graphs too (ours)."""
    graph_lora_step: bool = True
    """Replay the forward and backward of the scene LoRA's training step from CUDA graphs (the step's
    randomness, loss, finiteness check and optimiser step stay eager, in SceneDenoiser.train_step)."""
    fused_optimizer: bool = True
    """Use ``torch.optim.AdamW(fused=True)`` for the scene LoRA (same update rule, one kernel for all tensors)."""
    overlap_lora: bool = True
    """Queue the scene LoRA's training steps on a second CUDA stream, so they run alongside the scene's backward
    (they share no tensors until the next update's scene prediction, which waits for them; Guidance.join)."""
    vae_matmul_attention: bool = True
    """Run the VAE's self-attention (one head of width 512 in the SD / SDXL VAEs' mid-blocks) as cuBLAS matmuls and a
    softmax (:class:`MatmulAttention`) instead of SDPA: SDPA has no flash kernel for width 512, and the
    memory-efficient kernel's backward took 96 of the 193 ms of the refiner's 2 x 1024 px encode + backward and 19 ms
    of every SD 2.1 NeRF / mesh update on an H100 (bench/RESULTS.md run 4). bfloat16 / float32 VAEs compute it in
    their dtype, float16 VAEs (SD 2.1) in bfloat16: float16's range underflows the attention's small backward
    gradients (real SD 2.1 VAE architecture, float32 weights, CPU: image-gradient error 1.6% with float16 maths, 0.07%
    with bfloat16) and was slower (H100, 4 x 512 px encode + backward: SDPA 86.9 ms, float16 85.3, bfloat16 72.1). In
    the stages (H200, run 6): SD 2.1 NeRF / mesh updates 176.2 -> 167.5 / 124.9 -> 115.4 ms against SDPA.
    Costs one [B, N, N] attention matrix (1 GiB at 2 x 1024 px)."""
    compile: str = "blocks"
    """``torch.compile`` (default mode, static shapes) under the graphs: "blocks" compiles the UNet's repeated
    blocks (ResnetBlock2D, BasicTransformerBlock; regional compilation: each block class compiles once per
    shape and is shared by its instances), "unet" the whole UNet, "off" none. Measured on an H100, SD 2.1
    CFG call 8 x 64^2 replayed: 25.7 ms plain, 20.4 ms "blocks", 19.4 ms "unet" (68 s to compile); refiner
    CFG 84.5 -> 69.1 ms "blocks" (bench/RESULTS.md run 3). Fuses GroupNorm + SiLU, residual adds and attention's
    reshapes. The first use of a model in a process compiles for ~2-5 min (cold cache, measured on an H100); the
    kernels are kept in ~/.cache/dreamflow/torchinductor (dreamflow/compile_cache.py), so later processes start in
    ~20-26 s (H200, run 6)."""
    compile_vae: bool = True
    """With ``compile`` on, also compile the VAE encoder's ResnetBlock2D blocks (the stages differentiate
    through the encoder every update; its GroupNorm + SiLU forward and backward are memory-bound in eager
    mode; refiner 2 x 1024 px encode + backward 216 -> 192 ms). Skipped with ``cpu_offload`` (the VAE then
    moves between the CPU and the GPU around each stage; compiled blocks were not measured that way)."""
    warmup_calls: int = 2
    """Eager calls on the capture stream before each capture (lazy cuBLAS / cuDNN set-up must not be captured;
    PyTorch's CUDA-graph notes use 3, 2 measured enough here)."""
    max_graphs: int = 8
    """Captured shapes kept per call site; the least recently used one is dropped beyond this (each holds
    its output and shares the activation pool)."""

    def validate(self) -> "FastPathConfig":
        check(self.warmup_calls >= 1, f"fast path warmup_calls={self.warmup_calls} must be >= 1 (2 is usual)")
        check(self.max_graphs >= 1, f"fast path max_graphs={self.max_graphs} must be >= 1 (8 is usual)")
        check(self.compile in COMPILE_MODES, f"fast path compile='{self.compile}' is unknown; use one of: "
              f"{', '.join(COMPILE_MODES)}")
        return self


#: FastPathConfig.compile choices.
COMPILE_MODES = ("blocks", "unet", "off")
#: UNet sub-module classes compiled by compile="blocks" (every SD / SDXL UNet is made of these).
COMPILED_BLOCKS = ("ResnetBlock2D", "BasicTransformerBlock")


def compile_blocks(root: torch.nn.Module, mode: str, blocks: Tuple[str, ...] = COMPILED_BLOCKS) -> List[torch.nn.Module]:
    """Compile, in place (``nn.Module.compile``: the module objects stay, only their call changes), ``root`` itself
    (mode "unet") or its sub-modules whose class name is in ``blocks`` (mode "blocks"; a UNet or a VAE encoder).

    Returns the compiled modules (give them to :func:`uncompile`). Raises the recompile limit: one block
    class serves several shapes (resolution levels, CFG vs scene batch, LoRA on / off, grad / no grad).
    """
    if mode == "off":
        return []
    import torch._dynamo

    from ..compile_cache import use_persistent_compile_cache

    use_persistent_compile_cache()  # before the first compile: kernels kept between reboots

    # The SDXL refiner's ResnetBlock2D alone meets ~60 shapes (levels x in/out widths x CFG / scene / LoRA-step
    # batches x grad on / off): measured hitting a limit of 64 on an H100, after which shapes run eagerly.
    for name, value in (("recompile_limit", 512), ("cache_size_limit", 512), ("accumulated_recompile_limit", 4096),
                        ("accumulated_cache_size_limit", 4096)):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), value))
    mods = [root] if mode == "unet" else [m for m in root.modules() if type(m).__name__ in blocks]
    for m in mods:
        m.compile(dynamic=False)
    return mods


class MatmulAttention:
    """A diffusers attention processor for the VAEs' spatial self-attention: ``softmax(scale q k^T) v`` as cuBLAS
    matmuls (baddbmm, softmax, bmm) in ``compute_dtype`` (FastPathConfig.vae_matmul_attention). Anything else
    (masks, cross-attention, spatial norms, 3-D inputs) goes to ``fallback``, the processor it replaced."""

    def __init__(self, compute_dtype: torch.dtype, fallback):
        self.compute_dtype = compute_dtype
        self.fallback = fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if (encoder_hidden_states is not None or attention_mask is not None or attn.spatial_norm is not None
                or hidden_states.ndim != 4):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        B, C, H, W = hidden_states.shape
        h = hidden_states.view(B, C, H * W).transpose(1, 2)  # [B, N, C] tokens
        if attn.group_norm is not None:
            h = attn.group_norm(h.transpose(1, 2)).transpose(1, 2)
        q, k, v = (attn.head_to_batch_dim(f(h)).to(self.compute_dtype) for f in (attn.to_q, attn.to_k, attn.to_v))
        scores = torch.baddbmm(q.new_empty(q.shape[0], q.shape[1], k.shape[1]), q, k.transpose(1, 2), beta=0,
                               alpha=attn.scale)
        out = torch.bmm(scores.softmax(dim=-1), v).to(h.dtype)
        out = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(out)))
        out = out.transpose(1, 2).reshape(B, C, H, W)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def use_matmul_attention(vae: torch.nn.Module, compute_dtype: Optional[torch.dtype] = None) -> List[Tuple[torch.nn.Module, object]]:
    """Give every diffusers ``Attention`` of ``vae`` a :class:`MatmulAttention` processor. ``compute_dtype``: the
    VAE's dtype by default; float16 VAEs should pass bfloat16 (FastPathConfig.vae_matmul_attention says why).
    Returns (module, old processor) pairs to restore with ``module.set_processor``."""
    from diffusers.models.attention_processor import Attention

    saved = []
    for m in vae.modules():
        if isinstance(m, Attention):
            dtype = compute_dtype or next(m.parameters()).dtype
            saved.append((m, m.processor))
            m.set_processor(MatmulAttention(dtype, m.processor))
    return saved


def uncompile(modules: List[torch.nn.Module]) -> None:
    """Undo :func:`compile_blocks` (back to the modules' eager calls)."""
    for m in modules:
        m._compiled_call_impl = None



# --------------------------------------------------------------------------------------------
# A graph of one call at fixed shapes
# --------------------------------------------------------------------------------------------
#: _capture_stream_note: every graph here is captured on a capture stream of its own, not on
#: ``torch.cuda.graph``'s one default capture stream. PyTorch keys cuBLAS workspaces by stream, so graphs
#: captured on one stream share a workspace: replayed side by side they write it at once, and destroying one of
#: them can free the workspace the others still use (pytorch/pytorch#193402). Here graphs are dropped while
#: others live (a stage's scene-model graphs when the stage ends, LRU eviction), and an overlapped LoRA step may
#: replay beside the main stream. Cost: one cuBLAS workspace per capture stream. Caveat: ``torch.cuda.Stream()``
#: hands out streams from PyTorch's pool (32 per device and priority, round robin), so after many captures two
#: graphs can still meet on one stream; the stages capture a handful of graphs.

class _Graph:
    """One captured call ``fn(**inputs) -> Tensor`` with static input buffers.

    Args:
        fn: the call; must launch the same kernels for any values of inputs of these shapes and dtypes.
        example: name -> example input (its values are copied into the static buffer).
        dtypes: name -> dtype of the static buffer when it differs from the input's (``copy_`` then casts
            exactly as the eager ``.to(dtype)`` does).
        pool: memory-pool handle shared with the other graphs of the same owner.
        warmup: eager calls on the capture stream before capture.
    """

    def __init__(self, fn: Callable[..., Tensor], example: Dict[str, Tensor], dtypes: Dict[str, torch.dtype],
                 pool, warmup: int):
        self.static = {k: v.detach().to(dtypes.get(k, v.dtype), copy=True) for k, v in example.items()}
        device = next(iter(self.static.values())).device
        # Warm up on the graph's own capture stream (see _capture_stream_note): cuBLAS's workspace for it is then
        # set up before the capture.
        self.capture_stream = side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup):
                fn(**self.static)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph, pool=pool, stream=self.capture_stream):
            self.out = fn(**self.static)

    def __call__(self, inputs: Dict[str, Tensor]) -> Tensor:
        for k, v in inputs.items():
            self.static[k].copy_(v)
        self.graph.replay()
        return self.out


def _signature(inputs: Dict[str, Optional[Tensor]]) -> Tuple:
    return tuple((k, None) if v is None else (k, tuple(v.shape), v.dtype) for k, v in sorted(inputs.items()))


class _GraphCache:
    """Graphs of one call site keyed by input shapes / dtypes (LRU, ``max_graphs`` entries)."""

    def __init__(self, max_graphs: int):
        self.graphs: "OrderedDict[Tuple, _Graph]" = OrderedDict()
        self.max_graphs = max_graphs
        self.failed: set = set()
        self.captures = 0
        self.replays = 0

    def get(self, key: Tuple, build: Callable[[], object]):
        """The graph for ``key`` (built on first sight); None if building it failed (that shape stays eager)."""
        if key in self.failed:
            return None
        g = self.graphs.get(key)
        if g is None:
            try:
                g = build()
            except Exception as e:  # a kernel that cannot be captured: stay eager for this shape
                self.failed.add(key)
                log.warning("dreamflow: CUDA graph capture failed (%s: %s); this call stays eager",
                            type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
                return None
            self.graphs[key] = g
            self.captures += 1
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        self.replays += 1
        return g

    def run(self, key: Tuple, build: Callable[[], _Graph], inputs: Dict[str, Tensor]) -> Optional[Tensor]:
        """The replayed output for ``inputs`` (capturing on first sight of ``key``); None if capture failed."""
        g = self.get(key, build)
        return None if g is None else g(inputs)

    def clear(self) -> None:
        self.graphs.clear()
        self.failed.clear()


# --------------------------------------------------------------------------------------------
# When is a graph the same function as the eager call?
# --------------------------------------------------------------------------------------------
class _LoRAWatch:
    """Tells whether any peft adapter of a UNet is enabled (then its output is not the pretrained one).

    peft wraps target layers in ``BaseTunerLayer`` modules; the (parent, name, layer) triples are cached and
    re-scanned when the adapter names change or a cached layer is no longer in its place (an adapter removed
    and added again builds new layer objects).
    """

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self._key: Optional[Tuple] = None
        self._layers: List[Tuple[torch.nn.Module, str, torch.nn.Module]] = []

    def _scan(self) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._layers = []
        for parent in self.unet.modules():
            for name, child in parent.named_children():
                if isinstance(child, BaseTunerLayer):
                    self._layers.append((parent, name, child))

    def any_enabled(self) -> bool:
        config = getattr(self.unet, "peft_config", None)
        if not config:
            return False
        key = tuple(sorted(config))
        if key != self._key or not all(getattr(p, n, None) is layer for p, n, layer in self._layers):
            self._scan()
            self._key = key
        return any(not layer.disable_adapters for _, _, layer in self._layers)


def _needs_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _graphable(tensors) -> bool:
    """Common preconditions: CUDA tensors, no autocast, no gradients wanted, no capture in progress."""
    if not all(t is None or t.is_cuda for t in tensors):
        return False
    if torch.is_autocast_enabled("cuda") or _needs_grad(tensors):
        return False
    return not torch.cuda.is_current_stream_capturing()


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

    # ------------------------------------------------------------------ guidance
    def prepare_guidance(self, guidance) -> None:
        """Speed up a guidance's scene LoRA (APFO / VSD): graphed ``eps``, fused AdamW. No-op for SDS."""
        scene = getattr(guidance, "scene", None)
        if scene is None:
            return
        if self.config.fused_optimizer:
            use_fused_adamw(scene)
        # Instance attributes shadow SceneDenoiser.eps / .output for this scene model only; the guidance and
        # SceneDenoiser.train_step call them as before. They go with the scene model at the end of the stage.
        if self.config.graph_scene_eps and not isinstance(scene.__dict__.get("eps"), GraphedSceneEps):
            scene.eps = GraphedSceneEps(scene, self)
        if self.config.graph_lora_step and not isinstance(scene.__dict__.get("output"), GraphedSceneOutput):
            scene.output = GraphedSceneOutput(scene, self)


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


def _scene_call(scene, eager: Callable, x_t: Tensor, t, embeds, camera: Optional[Tensor]):
    """What the scene-model wrappers capture: ``(t, tensors, inputs, call)`` with ``t`` as a [B] tensor, every
    input tensor (for the graph preconditions), the named static inputs and ``call(**inputs)`` = ``eager(x_t, t,
    embeds, camera)`` (prompt embeddings passed as ``e_<field>`` tensors, rebuilt into PromptEmbeds)."""
    t = scene.denoiser._t(t, x_t.shape[0]) if not torch.is_tensor(t) or t.ndim == 0 else t
    emb = {f.name: getattr(embeds, f.name) for f in fields(embeds) if getattr(embeds, f.name) is not None}
    tensors = [x_t, t, camera, *emb.values()]
    inputs = {"x": x_t, "t": t, **{"e_" + k: v for k, v in emb.items()}}
    if camera is not None:
        inputs["camera"] = camera

    rebuild = type(embeds)  # PromptEmbeds (read from the value: this module does not import denoiser.py)

    def call(x, t, camera=None, **e):
        return eager(x, t, rebuild(**{k[2:]: v for k, v in e.items()}), camera)

    return t, tensors, inputs, call


class GraphedSceneEps:
    """``SceneDenoiser.eps`` replayed from CUDA graphs (same signature and result; falls back to eager).

    The capture records the whole call: camera MLP, the hook that adds its embedding to the UNet's time
    embedding, the LoRA-enabled UNet under autocast, and the v -> eps conversion.
    """

    def __init__(self, scene, fast: FastPath):
        self.scene = scene
        self.fast = fast
        self.eager = type(scene).eps.__get__(scene)  # the class's method, bound (not this wrapper)
        self.graphs = _GraphCache(fast.config.max_graphs)
        fast._caches.add(self.graphs)
        self.fallbacks = 0

    def __call__(self, x_t: Tensor, t, embeds, camera: Optional[Tensor]) -> Tensor:
        t, tensors, inputs, call = _scene_call(self.scene, self.eager, x_t, t, embeds, camera)
        if getattr(self.scene, "_removed", False) or not _graphable(tensors) or not self.fast._weights_unchanged():
            self.fallbacks += 1
            return self.eager(x_t, t, embeds, camera)
        out = self.graphs.run(_signature(inputs), lambda: _Graph(call, inputs, {}, self.fast.pool,
                                                                  self.fast.config.warmup_calls), inputs)
        if out is None:
            self.fallbacks += 1
            return self.eager(x_t, t, embeds, camera)
        return out.clone()


# --------------------------------------------------------------------------------------------
# The scene LoRA's training forward + backward
# --------------------------------------------------------------------------------------------
class _TrainGraphs:
    """Forward and backward graphs of one differentiable call at fixed shapes (``make_graphed_callables``'
    recipe): the forward graph recomputes ``out`` and the tensors autograd saved; the backward graph turns
    ``grad_out`` into the gradients of ``params``. A forward replay must precede each backward replay.
    """

    def __init__(self, fn: Callable[..., Tensor], example: Dict[str, Tensor], params: List[Tensor], pool,
                 warmup: int):
        self.static = {k: v.detach().clone() for k, v in example.items()}
        self.params = params
        device = params[0].device
        self.capture_stream = side = torch.cuda.Stream(device)  # warm-up and capture: see _Graph
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.enable_grad():
            for _ in range(warmup):  # autograd.grad leaves .grad untouched
                out = fn(**self.static)
                torch.autograd.grad(out, params, grad_outputs=torch.ones_like(out), allow_unused=True)
            del out
        torch.cuda.current_stream(device).wait_stream(side)
        self.fwd, self.bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.enable_grad(), torch.cuda.graph(self.fwd, pool=pool, stream=self.capture_stream):
            self.out = fn(**self.static)
        self.grad_out = torch.empty_like(self.out)
        with torch.cuda.graph(self.bwd, pool=pool, stream=self.capture_stream):
            self.grads = torch.autograd.grad(self.out, params, grad_outputs=self.grad_out, allow_unused=True)


class _Replay(torch.autograd.Function):
    """Autograd node whose forward / backward replay a :class:`_TrainGraphs` (inputs already copied in)."""

    @staticmethod
    def forward(ctx, graphs: _TrainGraphs, *params):
        ctx.graphs = graphs
        graphs.fwd.replay()
        return graphs.out.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        g = ctx.graphs
        g.grad_out.copy_(grad)
        g.bwd.replay()
        return (None,) + tuple(None if x is None else x.detach() for x in g.grads)


class GraphedSceneOutput:
    """``SceneDenoiser.output`` with autograd (the LoRA training step) replayed from CUDA graphs.

    Same signature and results as the eager call: forward = camera MLP, hook, LoRA-enabled UNet under
    autocast; backward = gradients of the LoRA and camera-MLP weights (none for the inputs, which the
    training step detaches). Without autograd (``scene.eps`` under ``no_grad``) it calls the eager method.
    The graphs use their own memory pool: the saved activations live between a forward and its backward.
    """

    def __init__(self, scene, fast: FastPath):
        self.scene = scene
        self.fast = fast
        self.eager = type(scene).output.__get__(scene)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs = _GraphCache(fast.config.max_graphs)
        fast._caches.add(self.graphs)
        self.fallbacks = 0

    def __call__(self, x_t: Tensor, t, embeds, camera: Optional[Tensor]) -> Tensor:
        scene = self.scene
        if not torch.is_grad_enabled():
            return self.eager(x_t, t, embeds, camera)
        t, tensors, inputs, call = _scene_call(scene, self.eager, x_t, t, embeds, camera)
        params = [] if getattr(scene, "_removed", False) else [p for p in scene.parameters_to_train() if p.requires_grad]
        if not params or not _graphable(tensors) or not self.fast._weights_unchanged():
            self.fallbacks += 1
            return self.eager(x_t, t, embeds, camera)
        key = _signature(inputs) + (tuple(id(p) for p in params),)
        g = self.graphs.get(key, lambda: _TrainGraphs(call, inputs, params, self.pool, self.fast.config.warmup_calls))
        if g is None:
            self.fallbacks += 1
            return self.eager(x_t, t, embeds, camera)
        for k, v in inputs.items():
            g.static[k].copy_(v)
        return _Replay.apply(g, *params)
