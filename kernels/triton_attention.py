"""Triton kernels for block-causal frame attention (the ``triton`` backend).

Written in the style of the Triton tutorial's fused attention (online softmax in base 2, fp32
accumulators), with two differences that come from the frame structure:

* the mask is block-causal, *token // T* gives the frame, and ``T`` need not be a multiple of the block
  sizes. For a query block only the key blocks that overlap the query block's own frames need masking;
  the keys of earlier frames are fully visible (no mask work) and the keys of later frames are skipped.
* inference attends a static, ragged KV cache (sink frames + a rolling window in ring order) given by a
  per-slot ``cache_valid`` vector, plus the new frames' own keys. That kernel is split-KV
  (flash-decoding): the cache is cut into ``NUM_SPLITS`` chunks, one program per (query block, head,
  chunk) plus one extra split for the new keys, and a second kernel merges the partial results with
  their log-sum-exp.

Kernels:
  ``_block_causal_fwd``      training forward (writes O and the base-2 LSE used by the backward)
  ``_block_causal_bwd_dkdv`` backward, one program per key block (loops over the queries that see it)
  ``_block_causal_bwd_dq``   backward, one program per query block
  ``_cached_attn_split``     inference, partial attention of one query block over one KV split
  ``_cached_attn_reduce``    inference, LSE merge of the splits

Each has its torch reference in :mod:`kernels.reference`. On a machine without CUDA these run only in
the Triton interpreter (``TRITON_INTERPRET=1`` set *before this module is imported*), which is slow and
supports fp32/fp16 only; bf16 is refused there because the interpreter computes garbage for it.
"""
from __future__ import annotations

import math
import os

import torch
from torch import Tensor

import triton
import triton.language as tl

__all__ = ["INTERPRET", "block_causal_attention", "block_causal_attention_fwd", "block_causal_attention_bwd",
           "cached_attention"]


def _interpret_mode() -> bool:
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # older triton
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Fixed when the kernels are decorated (i.e. at import): interpreted kernels run on CPU tensors only.
INTERPRET = _interpret_mode()
_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------------
# autotune configs: a few per kernel, so the first call of a shape compiles a handful of variants
# (each config is one Triton compile, about a second, and one timing), not dozens. Picked for head_dim
# 64 (every preset) on Hopper and Ampere after the Triton tutorial's fused attention: a large tile on
# the side a program owns, a narrow one on the side it loops over, 4 warps, 3 stages; one 8-warp
# variant. A single small config in the interpreter so the CPU tests stay fast.
# --------------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages) of each kernel's configs on a GPU
# training forward: one program per query block, looping over key blocks
FWD_TILES = ((64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3))
# backward dK/dV: one program per key block (BLOCK_N), looping over query blocks (BLOCK_M)
BWD_DKDV_TILES = ((32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3))
# backward dQ: one program per query block (BLOCK_M), looping over key blocks (BLOCK_N)
BWD_DQ_TILES = ((128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3))
# inference split-KV: one program per (query block, head, cache split), looping over the split's keys
SPLIT_TILES = ((64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 64, 8, 3))


def _configs(tiles):
    """triton.Configs of (BLOCK_M, BLOCK_N, num_warps, num_stages) tiles; the interpreter gets one 16x16."""
    if INTERPRET:
        tiles = ((16, 16, 1, 1),)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in tiles]


# --------------------------------------------------------------------------------------------------
# forward building blocks
# --------------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                    valid_base, stride_valid, offs_m, offs_d, lo, hi, T, qk_scale,
                    MASK_MODE: tl.constexpr,  # 0: no mask (whole blocks of earlier frames)
                                              # 1: block-causal rule + key bound (diagonal frames)
                                              # 2: per-slot valid vector + key bound (KV cache)
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    d_in = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASK_MODE == 0:
            kv_mask = d_in[None, :]
        else:
            n_in = offs_n < hi
            kv_mask = n_in[:, None] & d_in[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASK_MODE == 1:
            keep = ((offs_n[None, :] // T) <= (offs_m[:, None] // T)) & n_in[None, :]
            qk = tl.where(keep, qk, float("-inf"))
        if MASK_MODE == 2:
            valid = tl.load(valid_base + offs_n * stride_valid, mask=n_in, other=0)
            qk = tl.where((valid != 0)[None, :], qk, float("-inf"))
        # m_i starts at a finite -1e30, so a row whose keys are all masked gives p = 0, alpha = 1 (no NaN)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_block_causal(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                           offs_m, offs_d, start_m, L, T, qk_scale,
                           HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           DOT_PRECISION: tl.constexpr):
    """Queries [start_m, start_m + BLOCK_M) against keys [0, L) under the block-causal rule."""
    first_frame = start_m // T
    last_frame = (tl.minimum(start_m + BLOCK_M, L) - 1) // T
    full_end = (first_frame * T) // BLOCK_N * BLOCK_N  # keys < full_end: earlier frames, no mask
    kv_end = tl.minimum((last_frame + 1) * T, L)       # keys >= kv_end: later frames, skipped
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                    k_base, 0, offs_m, offs_d, 0, full_end, T, qk_scale,
                                    0, HEAD_DIM, BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                    k_base, 0, offs_m, offs_d, full_end, kv_end, T, qk_scale,
                                    1, HEAD_DIM, BLOCK_N, DOT_PRECISION)
    return acc, l_i, m_i


# --------------------------------------------------------------------------------------------------
# training: forward
# --------------------------------------------------------------------------------------------------
@triton.autotune(configs=_configs(FWD_TILES), key=["L", "T", "HEAD_DIM"])
@triton.jit
def _block_causal_fwd(Q, K, V, O, LSE,
                      stride_qb, stride_qh, stride_qm, stride_qd,
                      stride_kb, stride_kh, stride_kn, stride_kd,
                      stride_vb, stride_vh, stride_vn, stride_vd,
                      stride_ob, stride_oh, stride_om, stride_od,
                      H, L, T, qk_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < L
    io_mask = m_in[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=io_mask, other=0.0)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, l_i, m_i = _attn_fwd_block_causal(acc, l_i, m_i, q, K + b * stride_kb + h * stride_kh,
                                           V + b * stride_vb + h * stride_vh, stride_kn, stride_kd,
                                           stride_vn, stride_vd, offs_m, offs_d, start_m, L, T, qk_scale,
                                           HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), float("-inf"))
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             o.to(O.dtype.element_ty), mask=io_mask)
    tl.store(LSE + pid_bh.to(tl.int64) * L + offs_m, lse, mask=m_in)


# --------------------------------------------------------------------------------------------------
# training: backward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_qd, stride_dom,
                    stride_dod, offs_n, offs_d, lo, hi, L, T, qk_scale,
                    MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    d_in = offs_d < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_in = offs_m < L
        io_mask = m_in[:, None] & d_in[None, :]
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=io_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=io_mask, other=0.0)
        lse = tl.load(lse_base + offs_m, mask=m_in, other=float("inf"))  # rows past L: p = 0
        delta = tl.load(delta_base + offs_m, mask=m_in, other=0.0)
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        if MASKED:
            keep = (offs_m[None, :] // T) >= (offs_n[:, None] // T)
            qkT = tl.where(keep, qkT, float("-inf"))
        pT = tl.math.exp2(qkT - lse[None, :])
        dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.autotune(configs=_configs(BWD_DKDV_TILES), key=["L", "T", "HEAD_DIM"])
@triton.jit
def _block_causal_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV,
                           stride_qb, stride_qh, stride_qm, stride_qd,
                           stride_kb, stride_kh, stride_kn, stride_kd,
                           stride_vb, stride_vh, stride_vn, stride_vd,
                           stride_dob, stride_doh, stride_dom, stride_dod,
                           stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                           stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                           H, L, T, qk_scale, sm_scale,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n < L)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    first_frame = start_n // T
    last_frame = (tl.minimum(start_n + BLOCK_N, L) - 1) // T
    q_lo = first_frame * T  # queries of earlier frames never see these keys: skipped
    # queries of frames < last_frame see only part of the block (masked); from last_frame * T on, all of it
    masked_end = q_lo + tl.cdiv(last_frame * T - q_lo, BLOCK_M) * BLOCK_M
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    lse_base = LSE + pid_bh.to(tl.int64) * L
    delta_base = DELTA + pid_bh.to(tl.int64) * L
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_qd,
                             stride_dom, stride_dod, offs_n, offs_d, q_lo, masked_end, L, T, qk_scale,
                             True, HEAD_DIM, BLOCK_M, DOT_PRECISION)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_qd,
                             stride_dom, stride_dod, offs_n, offs_d, masked_end, L, L, T, qk_scale,
                             False, HEAD_DIM, BLOCK_M, DOT_PRECISION)
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                  offs_m, offs_d, lo, hi, T, qk_scale,
                  MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    d_in = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_in = offs_n < hi
        kv_mask = n_in[:, None] & d_in[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            keep = ((offs_n[None, :] // T) <= (offs_m[:, None] // T)) & n_in[None, :]
            qk = tl.where(keep, qk, float("-inf"))
        p = tl.math.exp2(qk - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.autotune(configs=_configs(BWD_DQ_TILES), key=["L", "T", "HEAD_DIM"])
@triton.jit
def _block_causal_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ,
                         stride_qb, stride_qh, stride_qm, stride_qd,
                         stride_kb, stride_kh, stride_kn, stride_kd,
                         stride_vb, stride_vh, stride_vn, stride_vd,
                         stride_dob, stride_doh, stride_dom, stride_dod,
                         stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                         H, L, T, qk_scale, sm_scale,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < L
    io_mask = m_in[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=io_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=io_mask, other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * L + offs_m, mask=m_in, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * L + offs_m, mask=m_in, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    first_frame = start_m // T
    last_frame = (tl.minimum(start_m + BLOCK_M, L) - 1) // T
    full_end = (first_frame * T) // BLOCK_N * BLOCK_N
    kv_end = tl.minimum((last_frame + 1) * T, L)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                       offs_m, offs_d, 0, full_end, T, qk_scale, False, HEAD_DIM, BLOCK_N, DOT_PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                       offs_m, offs_d, full_end, kv_end, T, qk_scale, True, HEAD_DIM, BLOCK_N, DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=io_mask)


# --------------------------------------------------------------------------------------------------
# inference: split-KV over the ragged cache + the new frames' own keys, then an LSE merge
# --------------------------------------------------------------------------------------------------
@triton.autotune(configs=_configs(SPLIT_TILES), key=["M", "S", "T", "HEAD_DIM", "NUM_SPLITS"])
@triton.jit
def _cached_attn_split(Q, K, V, KC, VC, VALID, PO, PLSE,
                       stride_qb, stride_qh, stride_qm, stride_qd,
                       stride_kb, stride_kh, stride_kn, stride_kd,
                       stride_vb, stride_vh, stride_vn, stride_vd,
                       stride_kcb, stride_kch, stride_kcn, stride_kcd,
                       stride_vcb, stride_vch, stride_vcn, stride_vcd,
                       stride_validb, stride_valids,
                       H, M, S, T, SPLIT_SIZE, NUM_SPLITS, qk_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """Program (query block, b*h, split). Splits 0..NUM_SPLITS-1 cover cache slots
    [split * SPLIT_SIZE, (split + 1) * SPLIT_SIZE) under ``cache_valid``; split NUM_SPLITS covers the new
    keys under the block-causal rule. Writes normalised partial O and base-2 LSE (-inf if nothing seen)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < M
    d_in = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_in[:, None] & d_in[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if pid_s < NUM_SPLITS:
        lo = pid_s * SPLIT_SIZE
        hi = tl.minimum(lo + SPLIT_SIZE, S)
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, KC + b * stride_kcb + h * stride_kch,
                                        VC + b * stride_vcb + h * stride_vch, stride_kcn, stride_kcd,
                                        stride_vcn, stride_vcd, VALID + b * stride_validb, stride_valids,
                                        offs_m, offs_d, lo, hi, T, qk_scale, 2, HEAD_DIM, BLOCK_N, DOT_PRECISION)
    else:
        acc, l_i, m_i = _attn_fwd_block_causal(acc, l_i, m_i, q, K + b * stride_kb + h * stride_kh,
                                               V + b * stride_vb + h * stride_vh, stride_kn, stride_kd,
                                               stride_vn, stride_vd, offs_m, offs_d, start_m, M, T, qk_scale,
                                               HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), float("-inf"))
    row = (pid_bh.to(tl.int64) * (NUM_SPLITS + 1) + pid_s) * M + offs_m
    tl.store(PO + row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=m_in[:, None] & d_in[None, :])
    tl.store(PLSE + row, lse, mask=m_in)


@triton.jit
def _cached_attn_reduce(PO, PLSE, O, stride_ob, stride_oh, stride_om, stride_od, H, M, NUM_SPLITS,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < M
    io_mask = m_in[:, None] & (offs_d < HEAD_DIM)[None, :]
    m_run = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_run = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in range(0, NUM_SPLITS + 1):
        row = (pid_bh.to(tl.int64) * (NUM_SPLITS + 1) + s) * M + offs_m
        lse = tl.load(PLSE + row, mask=m_in, other=float("-inf"))
        o = tl.load(PO + row[:, None] * HEAD_DIM + offs_d[None, :], mask=io_mask, other=0.0)
        m_new = tl.maximum(m_run, lse)
        alpha = tl.math.exp2(m_run - m_new)
        w = tl.math.exp2(lse - m_new)  # empty split: lse = -inf -> w = 0
        acc = acc * alpha[:, None] + w[:, None] * o
        l_run = l_run * alpha + w
        m_run = m_new
    out = acc / tl.where(l_run > 0, l_run, 1.0)[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=io_mask)


# --------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------
def _check_inputs(*tensors: Tensor) -> None:
    t0 = tensors[0]
    for t in tensors:
        if t.dtype != t0.dtype:
            raise ValueError(f"triton attention: dtypes differ ({t.dtype} vs {t0.dtype})")
        if t.device != t0.device:
            raise ValueError(f"triton attention: devices differ ({t.device} vs {t0.device})")
    if t0.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"triton attention: unsupported dtype {t0.dtype} (fp16, bf16, fp32)")
    if INTERPRET:
        if t0.device.type != "cpu":
            raise RuntimeError("triton attention: kernels were built for the Triton interpreter "
                               "(TRITON_INTERPRET=1) and take CPU tensors only")
        if t0.dtype == torch.bfloat16:
            raise ValueError("triton attention: the Triton interpreter computes garbage for bf16; "
                             "use fp32/fp16 on CPU or run on CUDA")
    elif t0.device.type != "cuda":
        raise RuntimeError(f"triton attention: needs CUDA tensors (got {t0.device}); set TRITON_INTERPRET=1 "
                           "before importing kernels to run the (slow) interpreter on CPU")
    d = t0.shape[-1]
    if d > 256:
        raise ValueError(f"triton attention: head_dim {d} > 256 is not supported")


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (no TF32), so that fp32 matches the reference
    return "ieee" if dtype == torch.float32 else "tf32"


def block_causal_attention_fwd(q: Tensor, k: Tensor, v: Tensor, tokens_per_frame: int,
                               out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Forward only. Returns (out (B, H, L, D), lse (B*H, L) fp32, base 2 of the scaled scores)."""
    _check_inputs(q, k, v)
    bsz, heads, length, d = q.shape
    if out is None:
        out = torch.empty((bsz, heads, length, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((bsz * heads, length), dtype=torch.float32, device=q.device)
    if length == 0 or bsz * heads == 0:
        return out, lse
    sm_scale = 1.0 / math.sqrt(d)

    def grid(meta):
        return (triton.cdiv(length, meta["BLOCK_M"]), bsz * heads)

    _block_causal_fwd[grid](q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                            heads, length, tokens_per_frame, sm_scale * _LOG2E,
                            HEAD_DIM=d, BLOCK_D=_block_d(d), DOT_PRECISION=_dot_precision(q.dtype))
    return out, lse


def block_causal_attention_bwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
                               tokens_per_frame: int, dq: Tensor | None = None, dk: Tensor | None = None,
                               dv: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of :func:`block_causal_attention_fwd`: returns (dq, dk, dv)."""
    bsz, heads, length, d = q.shape
    dout = dout.to(q.dtype)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
    if length == 0 or bsz * heads == 0:
        return dq, dk, dv
    delta = (out.float() * dout.float()).sum(-1).reshape(bsz * heads, length).contiguous()
    sm_scale = 1.0 / math.sqrt(d)
    common = dict(HEAD_DIM=d, BLOCK_D=_block_d(d), DOT_PRECISION=_dot_precision(q.dtype))

    def grid_n(meta):
        return (triton.cdiv(length, meta["BLOCK_N"]), bsz * heads)

    def grid_m(meta):
        return (triton.cdiv(length, meta["BLOCK_M"]), bsz * heads)

    _block_causal_bwd_dkdv[grid_n](q, k, v, dout, lse, delta, dk, dv, *q.stride(), *k.stride(), *v.stride(),
                                   *dout.stride(), *dk.stride(), *dv.stride(), heads, length, tokens_per_frame,
                                   sm_scale * _LOG2E, sm_scale, **common)
    _block_causal_bwd_dq[grid_m](q, k, v, dout, lse, delta, dq, *q.stride(), *k.stride(), *v.stride(),
                                 *dout.stride(), *dq.stride(), heads, length, tokens_per_frame,
                                 sm_scale * _LOG2E, sm_scale, **common)
    return dq, dk, dv


class _BlockCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, tokens_per_frame):
        out, lse = block_causal_attention_fwd(q, k, v, tokens_per_frame)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.tokens_per_frame = tokens_per_frame
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = block_causal_attention_bwd(q, k, v, out, lse, dout, ctx.tokens_per_frame)
        return dq, dk, dv, None


def block_causal_attention(q: Tensor, k: Tensor, v: Tensor, tokens_per_frame: int) -> Tensor:
    """Block-causal attention over whole clips, differentiable (Triton forward and backward)."""
    return _BlockCausalAttention.apply(q, k, v, tokens_per_frame)


def _num_splits(cache_len: int, parallel: int, device: torch.device) -> int:
    if cache_len == 0:
        return 0
    if INTERPRET:
        return min(4, triton.cdiv(cache_len, 32))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(2 * sms, max(parallel, 1))  # enough programs to fill the GPU twice over
    return max(1, min(want, triton.cdiv(cache_len, 256), 64))  # at least ~256 keys per split


def cached_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, cache_valid: Tensor,
                     tokens_per_frame: int, out: Tensor | None = None, num_splits: int | None = None) -> Tensor:
    """Inference attention of F new frames against a ragged static KV cache (split-KV). Not differentiable."""
    _check_inputs(q, k, v, k_cache, v_cache)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, k_cache, v_cache)):
        raise RuntimeError("triton cached_attention is inference-only (no backward); "
                           "call it under torch.no_grad() or use block_causal_attention for training")
    bsz, heads, m, d = q.shape
    s = k_cache.shape[-2]
    if out is None:
        out = torch.empty((bsz, heads, m, d), dtype=q.dtype, device=q.device)
    if m == 0 or bsz * heads == 0:
        return out
    valid = cache_valid
    if valid.dtype == torch.bool:
        valid = valid.view(torch.uint8) if valid.is_contiguous() else valid.to(torch.uint8)
    if num_splits is None:
        num_splits = _num_splits(s, bsz * heads * triton.cdiv(m, 64), q.device)
    num_splits = min(max(num_splits, 1), s) if s > 0 else 0
    align = 16 if INTERPRET else 128
    if num_splits:
        split_size = triton.cdiv(triton.cdiv(s, num_splits), align) * align
        num_splits = triton.cdiv(s, split_size)
    else:
        split_size = 0
    part_o = torch.empty((bsz * heads, num_splits + 1, m, d), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((bsz * heads, num_splits + 1, m), dtype=torch.float32, device=q.device)
    sm_scale = 1.0 / math.sqrt(d)
    block_d = _block_d(d)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), bsz * heads, num_splits + 1)

    _cached_attn_split[grid](q, k, v, k_cache, v_cache, valid, part_o, part_lse,
                             *q.stride(), *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
                             *valid.stride(), heads, m, s, tokens_per_frame, split_size, num_splits,
                             sm_scale * _LOG2E, HEAD_DIM=d, BLOCK_D=block_d, DOT_PRECISION=_dot_precision(q.dtype))
    block_m = 16 if INTERPRET else 32
    _cached_attn_reduce[(triton.cdiv(m, block_m), bsz * heads)](part_o, part_lse, out, *out.stride(), heads, m,
                                                                num_splits, HEAD_DIM=d, BLOCK_D=block_d,
                                                                BLOCK_M=block_m)
    return out
