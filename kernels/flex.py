"""FlexAttention backend (``torch.nn.attention.flex_attention``) with a block mask.

Findings for torch 2.13:
* CUDA: ``torch.compile(flex_attention)`` gives a fused kernel with forward and backward.
* CPU: the compiled path works (inductor generates a C++ kernel; needs a C++ compiler, and the first
  call per shape compiles for several seconds). The eager path also works but is unfused (it materialises
  the full score matrix). FlexAttention has **no backward on CPU**: asking for gradients there raises.

Masks: training uses a block mask cached per (L, T, device). Inference uses a block mask cached per shape
(all cache keys, block-causal among the new keys) plus a ``score_mod`` reading the per-call ``cache_valid``,
so the ragged validity costs no block-mask rebuild per step.

``KERNELS_FLEX_COMPILE`` picks the mode: ``1`` (default) compiled, ``0`` eager (slow, for debugging and
quick tests). A compile failure is raised, never turned into an unmasked fallback.
"""
from __future__ import annotations

import functools
import os
import shutil
import warnings

import torch
from torch import Tensor

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    _IMPORT_ERROR: str | None = None
except Exception as e:  # pragma: no cover - depends on the torch build
    create_block_mask = flex_attention = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"

__all__ = ["unavailable_reason", "block_causal_attention", "cached_attention", "compile_enabled"]


def compile_enabled() -> bool:
    return os.environ.get("KERNELS_FLEX_COMPILE", "1") != "0"


def _has_cxx() -> bool:
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)


def unavailable_reason(device: torch.device) -> str | None:
    """None if the flex backend can run on ``device``, else a one-line reason."""
    if _IMPORT_ERROR is not None:
        return f"flex backend: torch.nn.attention.flex_attention cannot be imported ({_IMPORT_ERROR})"
    if device.type not in ("cpu", "cuda"):
        return f"flex backend: FlexAttention does not run on {device.type}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "flex backend: CUDA is not available"
    if device.type == "cpu" and compile_enabled() and not _has_cxx():
        return ("flex backend: compiled FlexAttention on CPU needs a C++ compiler (none found); "
                "set KERNELS_FLEX_COMPILE=0 for the slow eager path")
    return None


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    return torch.compile(flex_attention)


def _run(q: Tensor, k: Tensor, v: Tensor, block_mask, score_mod=None) -> Tensor:
    """FlexAttention on checked inputs (``kernels.resolve_backend`` asked ``unavailable_reason`` once)."""
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError(f"flex backend: FlexAttention has no backward on CPU in torch {torch.__version__}; "
                           "train on CPU with the 'sdpa' or 'torch' backend")
    if not compile_enabled():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
    try:
        return _compiled_flex()(q, k, v, score_mod=score_mod, block_mask=block_mask)
    except Exception as e:
        raise RuntimeError(f"flex backend: torch.compile(flex_attention) failed on {q.device} "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                           "set KERNELS_FLEX_COMPILE=0 for the eager path") from e


@functools.lru_cache(maxsize=16)
def _block_causal_block_mask(length: int, tokens_per_frame: int, device: torch.device):
    t = tokens_per_frame

    def block_causal(b, h, q_idx, kv_idx):
        return (kv_idx // t) <= (q_idx // t)

    return create_block_mask(block_causal, None, None, length, length, device=device)


def block_causal_attention(q: Tensor, k: Tensor, v: Tensor, tokens_per_frame: int) -> Tensor:
    mask = _block_causal_block_mask(q.shape[-2], tokens_per_frame, q.device)
    return _run(q, k, v, mask)


@functools.lru_cache(maxsize=16)
def _cached_block_mask(num_new: int, cache_len: int, tokens_per_frame: int, device: torch.device):
    """Static per shape: every cache key visible, block-causal among the new keys. The per-call cache
    validity is applied by a score_mod instead, so no block mask is rebuilt at every step."""
    s, t = cache_len, tokens_per_frame

    def cache_then_block_causal(b, h, q_idx, kv_idx):
        return (kv_idx < s) | (((kv_idx - s) // t) <= (q_idx // t))

    return create_block_mask(cache_then_block_causal, None, None, num_new, s + num_new, device=device)


def cached_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, cache_valid: Tensor,
                     tokens_per_frame: int) -> Tensor:
    m, s = q.shape[-2], k_cache.shape[-2]
    if s == 0:  # nothing cached: plain block-causal attention among the new frames
        return _run(q, k, v, _block_causal_block_mask(m, tokens_per_frame, q.device))
    valid = cache_valid.to(torch.bool)

    def mask_invalid_slots(score, b, h, q_idx, kv_idx):
        slot = torch.clamp(kv_idx, max=s - 1)
        keep = (kv_idx >= s) | valid[b, slot]
        return torch.where(keep, score, -float("inf"))

    block_mask = _cached_block_mask(m, s, tokens_per_frame, q.device)
    return _run(q, torch.cat([k_cache, k], dim=-2), torch.cat([v_cache, v], dim=-2), block_mask,
                mask_invalid_slots)
