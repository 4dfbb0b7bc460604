"""CUDA graphs of the denoiser calls: one graph per input shape, the LRU cache of a call site, when a graph is the
same function as the eager call, and the scene model's graphed ``eps`` / ``output`` (forward + backward).

Used by :class:`~dreamflow.denoisers.fast.FastPath`; the module docstring of ``fast.py`` says what is replayed and
why a replay computes what the eager call computes.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import fields
from typing import Callable, ContextManager, Dict, List, Optional, Tuple

import torch

log = logging.getLogger("dreamflow")

Tensor = torch.Tensor


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

    def __init__(self, scene, fast):
        self.scene = scene
        self.fast = fast
        self.eager = scene.eager_eps
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
    ``grad_out`` into the gradients of ``params``. A forward replay must precede each backward replay. The
    backward runs (warm-up and capture) inside ``scope()``: a checkpointed UNet recomputes its forward there.
    """

    def __init__(self, fn: Callable[..., Tensor], example: Dict[str, Tensor], params: List[Tensor], pool,
                 warmup: int, scope: Callable[[], ContextManager] = nullcontext):
        self.static = {k: v.detach().clone() for k, v in example.items()}
        self.params = params
        device = params[0].device
        self.capture_stream = side = torch.cuda.Stream(device)  # warm-up and capture: see _Graph
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.enable_grad():
            for _ in range(warmup):  # autograd.grad leaves .grad untouched
                out = fn(**self.static)
                with scope():
                    torch.autograd.grad(out, params, grad_outputs=torch.ones_like(out), allow_unused=True)
            del out
        torch.cuda.current_stream(device).wait_stream(side)
        self.fwd, self.bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.enable_grad(), torch.cuda.graph(self.fwd, pool=pool, stream=self.capture_stream):
            self.out = fn(**self.static)
        self.grad_out = torch.empty_like(self.out)
        with scope(), torch.cuda.graph(self.bwd, pool=pool, stream=self.capture_stream):
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

    def __init__(self, scene, fast):
        self.scene = scene
        self.fast = fast
        self.eager = scene.eager_output
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
        g = self.graphs.get(key, lambda: _TrainGraphs(call, inputs, params, self.pool, self.fast.config.warmup_calls,
                                                      scope=scene.backward_scope))
        if g is None:
            self.fallbacks += 1
            return self.eager(x_t, t, embeds, camera)
        for k, v in inputs.items():
            g.static[k].copy_(v)
        return _Replay.apply(g, *params)
