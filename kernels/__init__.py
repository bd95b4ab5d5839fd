"""Block-causal frame attention: the only place the model's attention goes through.

A token of frame ``i`` attends to every token of frames ``<= i`` (bidirectional within a frame, causal
across frames); ``frame = token // tokens_per_frame``. Scale is ``1/sqrt(D)``; keys arrive already
position-encoded.

Backends (chosen explicitly; an unavailable one raises, it never falls back to an unmasked path):

* ``torch``  — plain reference, explicit boolean mask, softmax in fp32 (:mod:`kernels.reference`).
* ``sdpa``   — ``F.scaled_dot_product_attention`` with an explicit boolean mask (cached per shape).
  The CPU default in float32.
* ``matmul`` — two matrix multiplications in the inputs' dtype around a float32 softmax, the mask added
  to the scores as a float32 bias. The CPU default in bfloat16: at a frame's shapes (tens of queries,
  hundreds of keys) it takes about half as long as sdpa's CPU kernel
  (``benchmarks/attention_cpu_bf16.json``, from ``benchmarks/bench_attention.py``).
* ``flex``   — FlexAttention with a block mask (:mod:`kernels.flex`); compiled by default
  (``KERNELS_FLEX_COMPILE=0`` for eager). No backward on CPU.
* ``triton`` — the Triton kernels (:mod:`kernels.triton_attention`); CUDA, or the slow Triton
  interpreter on CPU when ``TRITON_INTERPRET=1`` was set before the first triton use.

Two ways in. ``resolve_backend(name, device)`` checks once that the backend exists and can run on the
device and returns its two functions (``Backend``), unchecked: what the model calls in its per-frame
path (it resolves when its backend is set, never per call). ``block_causal_attention`` and
``cached_attention`` check their inputs (name, shapes, dtypes, devices) on every call, then run the
same functions: for tests, benchmarks and callers with inputs of their own.
"""
from __future__ import annotations

import functools
import importlib
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import (block_causal_mask, reference_block_causal_attention,
                        reference_cached_attention)

__all__ = ["BACKENDS", "Backend", "block_causal_attention", "cached_attention", "available_backends", "check_backend",
           "resolve_backend"]

BACKENDS = ("torch", "sdpa", "matmul", "flex", "triton")


# --------------------------------------------------------------------------------------------------
# backend availability
# --------------------------------------------------------------------------------------------------
def _validate_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")


def _triton_module():
    return importlib.import_module(".triton_attention", __name__)


def _triton_reason(device: torch.device) -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:
        return f"triton backend: triton is not installed or cannot be imported ({type(e).__name__}: {e})"
    interpret_env = os.environ.get("TRITON_INTERPRET", "0") == "1"
    mod = sys.modules.get(__name__ + ".triton_attention")
    interpret = mod.INTERPRET if mod is not None else interpret_env
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "triton backend: CUDA is not available"
        if interpret:
            return ("triton backend: kernels were built for the Triton interpreter (TRITON_INTERPRET=1), "
                    "which takes CPU tensors only; unset it to run on CUDA")
        return None
    if device.type == "cpu":
        if interpret:
            return None
        return ("triton backend: needs a CUDA GPU (on CPU only through the slow Triton interpreter: set "
                "TRITON_INTERPRET=1 before triton kernels are first imported)")
    return f"triton backend: not supported on {device.type}"


def _unavailable_reason(name: str, device) -> str | None:
    _validate_name(name)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"{name} backend: CUDA is not available"
    if name in ("torch", "sdpa", "matmul"):
        return None
    if name == "flex":
        from . import flex
        return flex.unavailable_reason(device)
    return _triton_reason(device)


def available_backends(device) -> list[str]:
    """The backends that can run on ``device`` (a torch.device or string), in BACKENDS order."""
    return [name for name in BACKENDS if _unavailable_reason(name, device) is None]


def check_backend(name: str, device) -> None:
    """ValueError for an unknown name, RuntimeError (one line saying why) if it cannot run on ``device``."""
    reason = _unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(reason)


# --------------------------------------------------------------------------------------------------
# sdpa with explicit masks, cached per shape
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _cached_block_causal_mask(length: int, tokens_per_frame: int, device: torch.device) -> Tensor:
    return block_causal_mask(length, tokens_per_frame, device)


def _sdpa_block_causal(q: Tensor, k: Tensor, v: Tensor, tokens_per_frame: int) -> Tensor:
    mask = _cached_block_causal_mask(q.shape[-2], tokens_per_frame, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _sdpa_cached(q, k, v, k_cache, v_cache, cache_valid, tokens_per_frame):
    bsz, m, s = q.shape[0], q.shape[-2], k_cache.shape[-2]
    new_mask = _cached_block_causal_mask(m, tokens_per_frame, q.device)
    mask = torch.empty((bsz, 1, m, s + m), dtype=torch.bool, device=q.device)
    mask[..., :s] = cache_valid[:, None, None, :]
    mask[..., s:] = new_mask
    return F.scaled_dot_product_attention(q, torch.cat([k_cache, k], dim=-2), torch.cat([v_cache, v], dim=-2),
                                          attn_mask=mask)


# --------------------------------------------------------------------------------------------------
# matmul: two GEMMs in the inputs' dtype, the softmax in float32
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _cached_block_causal_bias(length: int, tokens_per_frame: int, device: torch.device) -> Tensor:
    """The block-causal mask as a float32 bias to add to scores: 0 where visible, -inf where not; (1, L)
    zeros for a single frame (all visible), else (L, L)."""
    if length <= tokens_per_frame:
        return torch.zeros((1, length), device=device)
    return torch.zeros((length, length), device=device).masked_fill_(
        ~block_causal_mask(length, tokens_per_frame, device), float("-inf"))


def _matmul_attention(q: Tensor, k: Tensor, v: Tensor, cache_valid: Tensor | None, tokens_per_frame: int) -> Tensor:
    """q (B, H, M, D) against k, v (B, H, S + M, D): the first S keys (a cache) visible where
    cache_valid (B, S) says (None: S = 0), the last M (the new frames) block-causal."""
    m = q.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    new = _cached_block_causal_bias(m, tokens_per_frame, q.device)
    if cache_valid is not None:  # (B, 1, M or 1, S + M) float32: 0 where visible, -inf where not
        cache = torch.where(cache_valid, 0.0, float("-inf"))[:, None, None, :]  # (B, 1, 1, S)
        bias = torch.cat((cache.expand(-1, 1, new.shape[0], -1), new.expand(cache_valid.shape[0], 1, -1, -1)), dim=-1)
    else:
        bias = new
    scores = torch.add(bias, torch.matmul(q, k.transpose(-1, -2)), alpha=scale)  # (B, H, M, S + M) float32
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


def _matmul_block_causal(q: Tensor, k: Tensor, v: Tensor, tokens_per_frame: int) -> Tensor:
    return _matmul_attention(q, k, v, None, tokens_per_frame)


def _matmul_cached(q, k, v, k_cache, v_cache, cache_valid, tokens_per_frame):
    return _matmul_attention(q, torch.cat([k_cache, k], dim=-2), torch.cat([v_cache, v], dim=-2), cache_valid,
                             tokens_per_frame)


# --------------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------------
def _check_qkv(q: Tensor, k: Tensor, v: Tensor, tokens_per_frame: int, what: str) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"{what}: q, k, v must be (B, H, L, D) of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if int(tokens_per_frame) != tokens_per_frame or tokens_per_frame <= 0:
        raise ValueError(f"{what}: tokens_per_frame must be a positive int, got {tokens_per_frame!r}")
    if q.shape[-2] % tokens_per_frame:
        raise ValueError(f"{what}: length {q.shape[-2]} is not a multiple of tokens_per_frame {tokens_per_frame}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{what}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")


def _check_cache(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_valid: Tensor) -> None:
    b, h, _, d = q.shape
    if k_cache.dim() != 4 or k_cache.shape[:2] != (b, h) or k_cache.shape[-1] != d or v_cache.shape != k_cache.shape:
        raise ValueError(f"cached_attention: k_cache, v_cache must be (B={b}, H={h}, S, D={d}), got "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if cache_valid.shape != (b, k_cache.shape[-2]) or cache_valid.dtype != torch.bool:
        raise ValueError(f"cached_attention: cache_valid must be bool (B={b}, S={k_cache.shape[-2]}), got "
                         f"{cache_valid.dtype} {tuple(cache_valid.shape)}")
    if not (k_cache.device == v_cache.device == cache_valid.device == q.device):
        raise ValueError(f"cached_attention: q on {q.device}, k_cache on {k_cache.device}, v_cache on "
                         f"{v_cache.device}, cache_valid on {cache_valid.device}: must be one device")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"cached_attention: cache dtype {k_cache.dtype} differs from q dtype {q.dtype}")


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Backend:
    """A backend resolved for a device: its two functions, which check nothing (``resolve_backend`` did).
    ``block_causal(q, k, v, tokens_per_frame)``; ``cached(q, k, v, k_cache, v_cache, cache_valid,
    tokens_per_frame)``: the signatures of ``block_causal_attention`` and ``cached_attention``."""
    name: str
    block_causal: Callable[..., Tensor]
    cached: Callable[..., Tensor]


def resolve_backend(name: str, device) -> Backend:
    """The backend ``name`` for ``device``: ValueError for an unknown name, RuntimeError (one line
    saying why) if it cannot run there. Checked here, once; the functions returned check nothing."""
    check_backend(name, device)
    if name == "torch":
        return Backend(name, reference_block_causal_attention, reference_cached_attention)
    if name == "sdpa":
        return Backend(name, _sdpa_block_causal, _sdpa_cached)
    if name == "matmul":
        return Backend(name, _matmul_block_causal, _matmul_cached)
    if name == "flex":
        from . import flex
        return Backend(name, flex.block_causal_attention, flex.cached_attention)
    triton_attention = _triton_module()
    return Backend(name, triton_attention.block_causal_attention, triton_attention.cached_attention)


def block_causal_attention(q: Tensor, k: Tensor, v: Tensor, tokens_per_frame: int, backend: str = "sdpa") -> Tensor:
    """Training / full recompute. q, k, v: (B, H, L, D), L = F * tokens_per_frame -> (B, H, L, D).

    Differentiable with every backend (flex: not on CPU, where FlexAttention has no backward).
    """
    _validate_name(backend)
    _check_qkv(q, k, v, tokens_per_frame, "block_causal_attention")
    return resolve_backend(backend, q.device).block_causal(q, k, v, tokens_per_frame)


def cached_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, cache_valid: Tensor,
                     tokens_per_frame: int, backend: str = "sdpa") -> Tensor:
    """Inference. q, k, v: (B, H, F*T, D), F new frames; k_cache, v_cache: (B, H, S, D) static slots
    (any order, ragged); cache_valid: (B, S) bool. New frame f attends every valid cache key and the new
    keys of frames <= f. Returns (B, H, F*T, D)."""
    _validate_name(backend)
    _check_qkv(q, k, v, tokens_per_frame, "cached_attention")
    _check_cache(q, k_cache, v_cache, cache_valid)
    return resolve_backend(backend, q.device).cached(q, k, v, k_cache, v_cache, cache_valid, tokens_per_frame)
