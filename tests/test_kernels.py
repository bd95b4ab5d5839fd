"""Block-causal attention: every backend against the torch reference (and the reference against a loop).

Without CUDA the Triton kernels run in the Triton interpreter (fp32/fp16, small shapes); the GPU tests
(bf16, realistic shapes, gradients) are marked ``gpu`` and skip without CUDA.
"""
import math
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():  # must precede the first import of the triton kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from worldmodel import kernels  # noqa: E402
from worldmodel.kernels import (BACKENDS, available_backends, block_causal_attention, cached_attention,  # noqa: E402
                     check_backend)
from worldmodel.kernels.reference import (reference_block_causal_attention, reference_cached_attention)  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _has_triton():
    try:
        import triton  # noqa: F401
        return True
    except Exception:
        return False


@pytest.fixture
def ta():
    """The Triton kernels module, if the triton backend can run here (else skip)."""
    if "triton" not in available_backends(DEV):
        pytest.skip(f"triton unavailable on {DEV}")
    from worldmodel.kernels import triton_attention
    return triton_attention
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.fixture(autouse=True)
def _eager_flex(monkeypatch):
    # compiled FlexAttention on CPU costs seconds of compile per shape: eager here, compiled in one test
    if not CUDA:
        monkeypatch.setenv("KERNELS_FLEX_COMPILE", "0")


def _qkv(b, h, length, d, dtype, device=DEV, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(b, h, length, d, generator=g).to(device=device, dtype=dtype) for _ in range(3)]


def _cpu_backends():
    return [b for b in ("sdpa", "matmul", "flex", "triton") if b in available_backends(DEV)]


# --------------------------------------------------------------------------------------------------
# the reference itself, against an independent frame-by-frame loop
# --------------------------------------------------------------------------------------------------
def _loop_block_causal(q, k, v, t):
    out = torch.empty(q.shape, dtype=torch.float64)
    for f in range(q.shape[-2] // t):
        qs, ks, vs = q[..., f * t:(f + 1) * t, :], k[..., :(f + 1) * t, :], v[..., :(f + 1) * t, :]
        w = torch.softmax(qs.double() @ ks.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
        out[..., f * t:(f + 1) * t, :] = w @ vs.double()
    return out


def _loop_cached(q, k, v, kc, vc, valid, t):
    out = torch.empty(q.shape, dtype=torch.float64)
    for b in range(q.shape[0]):
        kcb, vcb = kc[b][:, valid[b]], vc[b][:, valid[b]]
        for f in range(q.shape[-2] // t):
            ks = torch.cat([kcb, k[b][:, :(f + 1) * t]], 1).double()
            vs = torch.cat([vcb, v[b][:, :(f + 1) * t]], 1).double()
            qs = q[b][:, f * t:(f + 1) * t].double()
            out[b, :, f * t:(f + 1) * t] = torch.softmax(qs @ ks.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ vs
    return out


def test_reference_matches_frame_loop():
    q, k, v = _qkv(2, 2, 3 * 5, 8, torch.float32, "cpu")
    torch.testing.assert_close(reference_block_causal_attention(q, k, v, 5).double(), _loop_block_causal(q, k, v, 5),
                               atol=1e-5, rtol=1e-5)
    kc, vc, _ = _qkv(2, 2, 4 * 5, 8, torch.float32, "cpu", seed=1)
    valid = _cache_valid("sinks_wrap", 2, 4 * 5, 5)
    torch.testing.assert_close(reference_cached_attention(q, k, v, kc, vc, valid, 5).double(),
                               _loop_cached(q, k, v, kc, vc, valid, 5), atol=1e-5, rtol=1e-5)
    # the first frame of a clip attends only to itself
    torch.testing.assert_close(reference_block_causal_attention(q, k, v, 5)[..., :5, :],
                               reference_block_causal_attention(q[..., :5, :], k[..., :5, :], v[..., :5, :], 5))


# --------------------------------------------------------------------------------------------------
# cache layouts: ragged validity, sink frames, ring wrap-around
# --------------------------------------------------------------------------------------------------
def _cache_valid(kind: str, b: int, s: int, t: int, seed: int = 0) -> torch.Tensor:
    slots = s // t
    g = torch.Generator().manual_seed(seed)
    if kind == "ragged":  # arbitrary per-key validity, different per batch entry
        return torch.rand(b, s, generator=g) > 0.4
    if kind == "empty":
        return torch.zeros(b, s, dtype=torch.bool)
    if kind == "full":
        return torch.ones(b, s, dtype=torch.bool)
    assert kind == "sinks_wrap"  # slot 0 a sink; the rolling window wrapped so valid slots are not contiguous
    frame_valid = torch.zeros(b, slots, dtype=torch.bool)
    frame_valid[:, 0] = True
    window = slots - 1
    for i in range(b):
        head = (2 + i) % window  # ring head differs per batch entry
        for j in range(max(window - 1 - i, 1)):  # a partly filled window, wrapping around the end
            frame_valid[i, 1 + (head + j) % window] = True
    return frame_valid.repeat_interleave(t, dim=1)


# --------------------------------------------------------------------------------------------------
# backends against the reference: training path
# --------------------------------------------------------------------------------------------------
SHAPES = [  # (B, H, T, frames, D): T not a multiple of the 16-blocks, T < block, D not a power of two
    (2, 2, 20, 3, 32),
    (1, 2, 7, 5, 16),
    (1, 1, 16, 2, 24),
]


@pytest.mark.parametrize("backend", ["sdpa", "matmul", "flex", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_block_causal_forward_matches_reference(backend, dtype, shape):
    if backend not in available_backends(DEV):
        pytest.skip(f"{backend} unavailable on {DEV}")
    b, h, t, f, d = shape
    q, k, v = _qkv(b, h, t * f, d, dtype, seed=hash(shape) % 1000)
    ref = reference_block_causal_attention(q, k, v, t)
    out = block_causal_attention(q, k, v, t, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_forward_writes_every_output(dtype, ta):
    b, h, t, f, d = 2, 2, 20, 3, 32  # L = 60: not a multiple of the block size
    q, k, v = _qkv(b, h, t * f, d, dtype)
    out = torch.full_like(q, float("nan"))
    out_, lse = ta.block_causal_attention_fwd(q, k, v, t, out=out)
    assert out_ is out and not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out, reference_block_causal_attention(q, k, v, t), **TOL[dtype])
    # lse (base 2, scaled scores) against the reference's log-sum-exp
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(d)
    mask = kernels.block_causal_mask(t * f, t, q.device)
    ref_lse = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), -1) / math.log(2)
    torch.testing.assert_close(lse.view(b, h, -1), ref_lse, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("backend", ["sdpa", "matmul", "triton"])
@pytest.mark.parametrize("shape", [(2, 2, 20, 3, 32), (1, 1, 7, 5, 16)], ids=lambda s: "x".join(map(str, s)))
def test_block_causal_gradients_match_reference(backend, shape):
    if backend not in available_backends(DEV):
        pytest.skip(f"{backend} unavailable on {DEV}")
    b, h, t, f, d = shape
    # q, k, v as the model makes them: strided views of one (B, L, 3, H, D) projection
    g = torch.Generator().manual_seed(3)
    base = list(torch.randn(b, t * f, 3, h, d, generator=g).to(DEV).permute(2, 0, 3, 1, 4).unbind(0))
    dout = torch.randn(b, h, t * f, d, device=DEV)
    grads = []
    for fn in (lambda q, k, v: reference_block_causal_attention(q, k, v, t),
               lambda q, k, v: block_causal_attention(q, k, v, t, backend=backend)):
        q, k, v = [x.clone().requires_grad_() for x in base]
        fn(q, k, v).backward(dout)
        grads.append((q.grad, k.grad, v.grad))
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_triton_backward_writes_every_gradient(ta):
    b, h, t, f, d = 1, 2, 20, 3, 32
    q, k, v = _qkv(b, h, t * f, d, torch.float32, seed=5)
    dout = torch.randn_like(q)
    out, lse = ta.block_causal_attention_fwd(q, k, v, t)
    poisoned = [torch.full_like(q, float("nan")) for _ in range(3)]
    dq, dk, dv = ta.block_causal_attention_bwd(q, k, v, out, lse, dout, t, *poisoned)
    qr, kr, vr = [x.clone().requires_grad_() for x in (q, k, v)]
    reference_block_causal_attention(qr, kr, vr, t).backward(dout)
    for got, want in zip((dq, dk, dv), (qr.grad, kr.grad, vr.grad)):
        assert not got.isnan().any()
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# backends against the reference: inference path (KV cache)
# --------------------------------------------------------------------------------------------------
CACHE_CASES = [  # (B, H, T, new frames F, cache slots, D, validity)
    (2, 2, 20, 1, 5, 32, "sinks_wrap"),
    (2, 1, 20, 3, 5, 32, "ragged"),
    (1, 2, 16, 2, 4, 16, "empty"),
    (1, 1, 18, 2, 3, 16, "full"),
]


def _cache_inputs(case, dtype, seed=0):
    b, h, t, f, slots, d, kind = case
    q, k, v = _qkv(b, h, t * f, d, dtype, seed=seed)
    kc, vc, _ = _qkv(b, h, t * slots, d, dtype, seed=seed + 1)
    valid = _cache_valid(kind, b, t * slots, t, seed).to(DEV)
    return q, k, v, kc, vc, valid, t


@pytest.mark.parametrize("backend", ["sdpa", "matmul", "flex", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CACHE_CASES, ids=lambda c: f"{c[6]}-F{c[3]}")
def test_cached_attention_matches_reference(backend, dtype, case):
    if backend not in available_backends(DEV):
        pytest.skip(f"{backend} unavailable on {DEV}")
    args = _cache_inputs(case, dtype)
    ref = reference_cached_attention(*args)
    with torch.no_grad():
        out = cached_attention(*args, backend=backend)
    assert out.shape == args[0].shape and out.dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("frames", [1, 2])
def test_matmul_bf16_matches_reference_at_a_frames_shapes(frames):
    # the CPU default in bfloat16, at the tiny model's shapes: 48 tokens a frame, 8 cached frames (the
    # first empty), 4 heads of 64; fresh random inputs, against the float32 reference
    q, k, v, kc, vc, valid, t = _cache_inputs((1, 4, 48, frames, 8, 64, "sinks_wrap"), torch.float32, seed=11 + frames)
    ref = reference_cached_attention(q, k, v, kc, vc, valid, t)
    with torch.no_grad():
        out = cached_attention(*[x.bfloat16() for x in (q, k, v, kc, vc)], valid, t, backend="matmul")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, **TOL[torch.bfloat16])


_FAULTS = """
import resource, sys, torch
from worldmodel.device import keep_freed_memory
from worldmodel.kernels import resolve_backend
torch.set_num_threads(1)
if sys.argv[1] == "keep":
    assert keep_freed_memory()
attend = resolve_backend("matmul", torch.device("cpu"))
q, k, v = [torch.randn(1, 4, 4 * 48, 64, dtype=torch.bfloat16) for _ in range(3)]  # a pass of 4 frames
kc, vc = [torch.randn(1, 4, 8 * 48, 64, dtype=torch.bfloat16) for _ in range(2)]
valid = torch.ones(1, 8 * 48, dtype=torch.bool)
with torch.inference_mode():
    attend.cached(q, k, v, kc, vc, valid, 48)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        attend.cached(q, k, v, kc, vc, valid, 48)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_keeping_freed_memory_stops_the_page_faults_of_every_pass():
    # the engine's allocator setting (worldmodel.device.keep_freed_memory, process-wide: fresh processes):
    # without it, glibc hands the scores of a 4-frame pass back to the OS and faults them in on every call
    faults = {mode: int(subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("default", "keep")}
    assert faults["keep"] < faults["default"] / 10, faults


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_cached_writes_every_output_any_split(num_splits, dtype, ta):
    q, k, v, kc, vc, valid, t = _cache_inputs((2, 2, 20, 2, 5, 32, "sinks_wrap"), dtype, seed=7)
    valid[1] = _cache_valid("ragged", 1, 100, 20, seed=8)[0]  # one batch entry ring, the other ragged
    out = torch.full_like(q, float("nan"))
    with torch.no_grad():
        ta.cached_attention(q, k, v, kc, vc, valid, t, out=out, num_splits=num_splits)
    assert not out.isnan().any()
    torch.testing.assert_close(out, reference_cached_attention(q, k, v, kc, vc, valid, t), **TOL[dtype])


@pytest.fixture
def force_tiles(ta):
    """force_tiles(kernel_name, tile): that kernel's autotuner runs exactly this GPU (BLOCK_M, BLOCK_N,
    warps, stages) tile (the interpreter otherwise gets one 16x16 config); restored afterwards."""
    import triton

    saved = {}

    def force(name, tile):
        kernel = getattr(ta, name)
        saved.setdefault(name, kernel.configs)
        bm, bn, w, s = tile
        kernel.configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)]
        kernel.cache.clear()

    yield force
    for name, configs in saved.items():
        getattr(ta, name).configs = configs
        getattr(ta, name).cache.clear()


def test_every_gpu_autotune_tile_matches_reference(ta, force_tiles):
    """Each tile the GPU autotuner may pick computes the same attention and gradients: L = 160 spans
    several blocks of every tile and T = 20 puts frame edges inside them; the cache has a sink and a
    wrapped window, split in two."""
    b, h, t, f, d = 1, 1, 20, 8, 32
    q, k, v = _qkv(b, h, t * f, d, torch.float32, seed=31)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(32))
    qr, kr, vr = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = reference_block_causal_attention(qr, kr, vr, t)
    ref.backward(dout)
    train = {"_block_causal_fwd": ta.FWD_TILES, "_block_causal_bwd_dkdv": ta.BWD_DKDV_TILES,
             "_block_causal_bwd_dq": ta.BWD_DQ_TILES}
    for i in range(max(len(tiles) for tiles in train.values())):
        for name, tiles in train.items():
            force_tiles(name, tiles[i % len(tiles)])
        qg, kg, vg = [x.clone().requires_grad_() for x in (q, k, v)]
        out = ta.block_causal_attention(qg, kg, vg, t)
        out.backward(dout)
        torch.testing.assert_close(out, ref.detach(), **TOL[torch.float32])
        for got, want in zip((qg.grad, kg.grad, vg.grad), (qr.grad, kr.grad, vr.grad)):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    qc, kc_new, vc_new, kc, vc, valid, _ = _cache_inputs((1, 2, t, 2, 8, d, "sinks_wrap"), torch.float32, seed=33)
    want = reference_cached_attention(qc, kc_new, vc_new, kc, vc, valid, t)
    for tile in ta.SPLIT_TILES:
        force_tiles("_cached_attn_split", tile)
        with torch.no_grad():
            out = ta.cached_attention(qc, kc_new, vc_new, kc, vc, valid, t, num_splits=2)
        torch.testing.assert_close(out, want, **TOL[torch.float32])


def test_triton_cached_strided_cache_and_no_cache(ta):
    b, h, t, d = 1, 2, 16, 32
    q, k, v = _qkv(b, h, 2 * t, d, torch.float32, seed=11)
    # a cache stored (B, S, H, D) and viewed as (B, H, S, D): non-contiguous strides
    kc = torch.randn(b, 3 * t, h, d).transpose(1, 2)
    vc = torch.randn(b, 3 * t, h, d).transpose(1, 2)
    valid = _cache_valid("ragged", b, 3 * t, t, seed=12)
    with torch.no_grad():
        out = ta.cached_attention(q, k, v, kc, vc, valid, t)
        torch.testing.assert_close(out, reference_cached_attention(q, k, v, kc, vc, valid, t), **TOL[torch.float32])
        empty = torch.empty(b, h, 0, d)
        out0 = ta.cached_attention(q, k, v, empty, empty, torch.zeros(b, 0, dtype=torch.bool), t)
    torch.testing.assert_close(out0, reference_block_causal_attention(q, k, v, t), **TOL[torch.float32])


def test_cached_attention_equals_full_recompute_on_the_last_frames():
    # a clip of 4 frames: the last 2 frames via the cache (first 2 frames cached, in swapped slots)
    t, d = 6, 16
    q, k, v = _qkv(1, 2, 4 * t, d, torch.float32, seed=21)
    full = block_causal_attention(q, k, v, t, backend="sdpa")
    kc = torch.cat([k[..., t:2 * t, :], torch.zeros_like(k[..., :t, :]), k[..., :t, :]], -2)
    vc = torch.cat([v[..., t:2 * t, :], torch.ones_like(v[..., :t, :]), v[..., :t, :]], -2)
    valid = torch.tensor([[True] * t + [False] * t + [True] * t])
    for backend in ["torch"] + _cpu_backends():
        with torch.no_grad():
            out = cached_attention(q[..., 2 * t:, :], k[..., 2 * t:, :], v[..., 2 * t:, :], kc, vc, valid, t,
                                   backend=backend)
        torch.testing.assert_close(out, full[..., 2 * t:, :], atol=1e-5, rtol=1e-5, msg=backend)


# --------------------------------------------------------------------------------------------------
# backend selection: errors, never a silent fallback
# --------------------------------------------------------------------------------------------------
def test_unknown_backend_raises_value_error_naming_the_choices():
    q, k, v = _qkv(1, 1, 8, 16, torch.float32, "cpu")
    for call in (lambda: block_causal_attention(q, k, v, 4, backend="xformers"),
                 lambda: cached_attention(q, k, v, k, v, torch.ones(1, 8, dtype=torch.bool), 4, backend="fast"),
                 lambda: check_backend("nope", "cpu")):
        with pytest.raises(ValueError) as err:
            call()
        assert all(name in str(err.value) for name in BACKENDS)


def test_available_backends_and_unavailable_backend_raises(monkeypatch):
    cpu = available_backends("cpu")
    assert cpu[:2] == ["torch", "sdpa"] and set(cpu) <= set(BACKENDS)
    if not CUDA:
        assert available_backends("cuda") == []
        for name in BACKENDS:
            with pytest.raises(RuntimeError):
                check_backend(name, "cuda")
    with pytest.raises(RuntimeError):
        check_backend("triton", "meta")
    if _has_triton():  # kernels built for the GPU cannot take CPU tensors: an error, not the reference
        from worldmodel.kernels import triton_attention as ta
        monkeypatch.setattr(ta, "INTERPRET", False)
        assert "triton" not in available_backends("cpu")
        q, k, v = _qkv(1, 1, 8, 16, torch.float32, "cpu")
        with pytest.raises(RuntimeError, match="triton"):
            block_causal_attention(q, k, v, 4, backend="triton")
        with pytest.raises(RuntimeError, match="triton"):
            ta.block_causal_attention(q, k, v, 4)


def test_flex_backward_on_cpu_raises_clearly():
    q, k, v = [x.requires_grad_() for x in _qkv(1, 1, 8, 16, torch.float32, "cpu")]
    with pytest.raises(RuntimeError, match="flex"):
        block_causal_attention(q, k, v, 4, backend="flex")


def test_bad_shapes_raise():
    q, k, v = _qkv(1, 1, 8, 16, torch.float32, "cpu")
    with pytest.raises(ValueError):
        block_causal_attention(q, k, v, 3)  # 8 tokens is not a whole number of 3-token frames
    with pytest.raises(ValueError):
        cached_attention(q, k, v, k, v, torch.ones(1, 8), 4)  # cache_valid not bool
    with pytest.raises(ValueError):
        cached_attention(q, k, v, k, v, torch.ones(1, 7, dtype=torch.bool), 4)


@pytest.mark.skipif(CUDA, reason="interpreter-only check")
def test_triton_interpreter_refuses_bf16(ta):
    q, k, v = _qkv(1, 1, 16, 16, torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match="bf16"):
        block_causal_attention(q, k, v, 8, backend="triton")


@pytest.mark.slow
def test_compiled_flex_on_cpu(monkeypatch):
    monkeypatch.setenv("KERNELS_FLEX_COMPILE", "1")
    if "flex" not in available_backends("cpu"):
        pytest.skip("compiled flex unavailable on CPU")
    args = [x.cpu() for x in _cache_inputs((2, 2, 16, 2, 4, 16, "sinks_wrap"), torch.float32)[:6]] + [16]
    with torch.no_grad():
        out = cached_attention(*args, backend="flex")
    torch.testing.assert_close(out, reference_cached_attention(*args), **TOL[torch.float32])


# --------------------------------------------------------------------------------------------------
# GPU: bf16 / fp16 at realistic shapes, gradients
# --------------------------------------------------------------------------------------------------
GPU_SHAPES = [(2, 4, 48, 6, 64), (1, 8, 192, 4, 64), (1, 16, 336, 3, 64)]  # tiny, small, nfd-310m


@gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["sdpa", "flex", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_block_causal_forward_and_gradients(backend, dtype, shape):
    check_backend(backend, "cuda")
    b, h, t, f, d = shape
    base = _qkv(b, h, t * f, d, dtype, "cuda", seed=1)
    dout = torch.randn(b, h, t * f, d, device="cuda", dtype=dtype)
    qr, kr, vr = [x.float().requires_grad_() for x in base]
    ref = reference_block_causal_attention(qr, kr, vr, t)
    ref.backward(dout.float())
    q, k, v = [x.clone().requires_grad_() for x in base]
    out = block_causal_attention(q, k, v, t, backend=backend)
    out.backward(dout)
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])
    for name, got, want in zip("qkv", (q.grad, k.grad, v.grad), (qr.grad, kr.grad, vr.grad)):
        rel = ((got.float() - want).norm() / want.norm()).item()
        assert rel < 2e-2, f"d{name}: relative error {rel:.3g}"
    if backend == "triton":  # every element written
        from worldmodel.kernels import triton_attention as ta
        poisoned = torch.full_like(base[0], float("nan"))
        with torch.no_grad():
            ta.block_causal_attention_fwd(*base, t, out=poisoned)
        assert not poisoned.isnan().any()
        torch.testing.assert_close(poisoned.float(), ref.detach(), **TOL[dtype])


@gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["sdpa", "flex", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", [(1, 4, 48, 1, 16, 64, "sinks_wrap"), (2, 8, 192, 4, 12, 64, "ragged"),
                                  (1, 16, 336, 8, 32, 64, "sinks_wrap"), (1, 16, 336, 1, 32, 64, "full"),
                                  (1, 4, 48, 2, 8, 64, "empty")], ids=lambda c: f"T{c[2]}-F{c[3]}-{c[6]}")
def test_gpu_cached_attention(backend, dtype, case):
    check_backend(backend, "cuda")
    args = _cache_inputs(case, dtype, seed=2)
    ref = reference_cached_attention(*[a.float() if a.is_floating_point() else a for a in args[:6]], args[6])
    with torch.no_grad():
        out = cached_attention(*args, backend=backend)
    tol = dict(atol=1e-3, rtol=1e-3) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(out.float(), ref, **tol)
    if backend == "triton":  # every element written, for several split counts
        from worldmodel.kernels import triton_attention as ta
        for ns in (1, 5):
            poisoned = torch.full_like(args[0], float("nan"))
            with torch.no_grad():
                ta.cached_attention(*args, out=poisoned, num_splits=ns)
            assert not poisoned.isnan().any()
            torch.testing.assert_close(poisoned.float(), ref, **tol)
