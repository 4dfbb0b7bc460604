"""The VAEs' spatial self-attention as cuBLAS matmuls (``FastPathConfig.vae_matmul_attention``; why: that field's
docstring)."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

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
