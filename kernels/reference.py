"""Plain torch reference for block-causal frame attention (the ``torch`` backend).

Every kernel in this package is checked against these two functions. They build the boolean mask
explicitly and do the softmax in fp32 (float64 for float64 inputs, the GPU suite's reference), so they
are slow and memory hungry (O(L^2)) but obviously right.

Block-causal rule: a token of frame ``i`` attends to every token of frames ``<= i``: bidirectional within
a frame, causal across frames. The frame of token ``t`` is ``t // tokens_per_frame``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["block_causal_mask", "cached_attention_mask", "reference_block_causal_attention",
           "reference_cached_attention"]


def block_causal_mask(length: int, tokens_per_frame: int, device=None) -> Tensor:
    """(L, L) bool, True where query ``i`` may attend key ``j``: ``j // T <= i // T``."""
    frame = torch.arange(length, device=device) // tokens_per_frame
    return frame[None, :] <= frame[:, None]


def cached_attention_mask(cache_valid: Tensor, num_new: int, tokens_per_frame: int) -> Tensor:
    """(B, 1, M, S + M) bool mask of ``M = F*T`` new queries against ``[cache keys, new keys]``.

    Cache keys are visible where ``cache_valid`` (B, S) is True (to every new query); new keys follow the
    block-causal rule among the new frames.
    """
    b, s = cache_valid.shape
    cache_part = cache_valid.to(torch.bool)[:, None, None, :].expand(b, 1, num_new, s)
    new_part = block_causal_mask(num_new, tokens_per_frame, cache_valid.device)[None, None].expand(b, 1, -1, -1)
    return torch.cat([cache_part, new_part], dim=-1)


def _masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1])
    ct = torch.promote_types(q.dtype, torch.float32)  # fp32, or float64 for float64 inputs
    scores = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.to(ct)).to(q.dtype)


def reference_block_causal_attention(q: Tensor, k: Tensor, v: Tensor, tokens_per_frame: int) -> Tensor:
    """Training / full recompute. q, k, v: (B, H, L, D), L = F*T. Differentiable."""
    mask = block_causal_mask(q.shape[-2], tokens_per_frame, q.device)
    return _masked_attention(q, k, v, mask)


def reference_cached_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                               cache_valid: Tensor, tokens_per_frame: int) -> Tensor:
    """Inference. q, k, v: (B, H, F*T, D) new frames; k_cache, v_cache: (B, H, S, D); cache_valid: (B, S)."""
    mask = cached_attention_mask(cache_valid, q.shape[-2], tokens_per_frame)
    return _masked_attention(q, torch.cat([k_cache, k], dim=-2), torch.cat([v_cache, v], dim=-2), mask)
