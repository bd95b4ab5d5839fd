"""The GPU suite: one command that spends a lent GPU's few minutes on measurement, not on debugging.

    OUT=/tmp/suite bash scripts/gpu_suite.sh                  # on a GPU: about 7 minutes (--budget-s 420)
    python benchmarks/gpu_suite.py --out DIR --limit engine=200 --stages kernels,engine
    python benchmarks/gpu_suite.py --out DIR --smoke          # on a CPU, tiny sizes: checks the suite itself

Stages, in this order, each in its own process under its own time limit (a hang or a CUDA error in one
cannot take the others down), each rewriting DIR/<stage>.json as its results come in, so that a stage
stopped at its limit keeps what it measured and is marked `timed_out`:

  device     the GPU (name, driver, CUDA, memory, clocks), torch and triton versions; the datasheet's dense
             bf16 TFLOP/s and memory GB/s (bench_attention.PEAKS) and the ceilings measured here: an
             8192^3 bf16 matrix product on random data and a 2 GiB device-to-device copy (read + write).
  kernels    correctness of the attention backends (triton, sdpa, flex) in bf16 and fp16 against the
             torch reference computed in float64: training forward and backward (dq, dk, dv), split-KV
             inference against a ragged cache with sink frames and ring wrap-around (and an empty or full
             one); ||out - ref|| / ||ref|| per output, every element written (outputs poisoned with NaN
             first), the first call's time (Triton compile + autotune) and the autotune picks.
  attention  benchmarks/bench_attention.py at the inference shapes of nfd-310m and tiny (F = 1, 2, 4 new
             frames against the KV cache: one frame, or one plus speculative drafts) and at their training
             shapes: Triton vs SDPA (the kernel PyTorch picked is recorded) vs FlexAttention; ms from CUDA
             graph replays, TFLOP/s and GB/s against the peaks.
  engine     WorldModel.step of nfd-310m with random weights (worldmodel.evaluation.timing.measure): eager, then
             compiled (inductor + CUDA graphs), a 2,000-frame rollout (latency against rollout length),
             1-3 steps, speculative 2 and 4, CUDA graphs without inductor, inductor without CUDA graphs,
             the other attention backends; frames/s, p50/p99 latency, torch.compile's counters.
  training   training throughput (worldmodel.training.train_cli.measure_throughput) of tiny and small with bf16
             autocast and torch.compile at the largest batch that fits (descending batches, out-of-memory
             caught): clips/s and MFU, then eager, the device's work alone, and a profile of a step.

Then DIR/summary.json (each stage's status and the headline figures), DIR/gpu_suite.png and DIR/suite.log
(every stage's output): eight files, the most the device tool brings back.

Honest counts. Attention FLOPs: 4*D per visible query-key pair (bench_attention). Training FLOPs (MFU): one
forward of the real model counted by torch.utils.flop_counter.FlopCounterMode on the meta device (every
matrix product), with attention counted for the visible (block-causal) query-key pairs only, times 3 for
forward + backward (no recomputation counted; norms and elementwise work not counted). MFU is given
against the datasheet's dense bf16 peak and against the matrix-product ceiling measured by the device
stage.

Each stage plans within its own limit: items are ordered by interest and an item that would not finish in
the time left is recorded as skipped, with the reason; the stage's process is killed at its limit in any
case. `--smoke` runs every stage on the CPU at tiny sizes (the Triton kernels in the interpreter, compile
skipped) so that the whole suite is known to work before a GPU is touched (tests/test_gpu_suite.py).
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(Path(__file__).resolve().parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from worldmodel.files import atomic_write_json  # noqa: E402  (no torch work at import)

# stage name -> default time limit (s); the defaults add up to the default total budget of 7 minutes
STAGES = {"device": 20, "kernels": 65, "attention": 95, "engine": 140, "training": 100}
DEFAULT_BUDGET_S = 420
MIN_STAGE_S = 10  # a stage is not started with less than this left of the total budget
SUMMARY, LOG, PLOT = "summary.json", "suite.log", "gpu_suite.png"
# float64 reference, ||out - ref|| / ||ref||: fp32 products land far below 1e-4, fp16 near 1e-3, bf16
# between 1e-3 and 1e-2
REL_TOL = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 2e-2}


# --------------------------------------------------------------------------------------------------
# provenance
# --------------------------------------------------------------------------------------------------
def source_digest() -> str:
    """sha256 (12 hex) of the Python sources and scripts the suite runs: identifies the code where the
    working tree travelled without its .git (`python benchmarks/gpu_suite.py --digest` in a checkout)."""
    h = hashlib.sha256()
    for pattern in ("kernels/*.py", "worldmodel/*.py", "benchmarks/*.py", "scripts/*.sh"):
        for p in sorted(ROOT.glob(pattern)):
            h.update(p.relative_to(ROOT).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def nvidia_smi() -> dict:
    """What nvidia-smi says of GPU 0 (driver, clocks, power, temperature); {} without it."""
    fields = ("name", "driver_version", "memory.total", "clocks.sm", "clocks.max.sm", "clocks.mem",
              "temperature.gpu", "power.draw", "power.limit", "pstate")
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode or not out.stdout.strip():
        return {}
    values = [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")]
    return dict(zip(fields, values))


def device_summary(dev) -> dict:
    import torch

    from worldmodel.device import cpu_name

    if dev.type != "cuda":
        return {"type": dev.type, "name": f"{cpu_name()} ({os.cpu_count()} cores)", "threads": torch.get_num_threads()}
    p = torch.cuda.get_device_properties(dev)
    smi = nvidia_smi()
    return {"type": "cuda", "name": torch.cuda.get_device_name(dev), "capability": f"{p.major}.{p.minor}",
            "multiprocessors": p.multi_processor_count, "memory_gb": round(p.total_memory / 2**30, 1),
            "l2_mb": round(getattr(p, "L2_cache_size", 0) / 2**20, 1) or None, "driver": smi.get("driver_version"),
            "cuda": torch.version.cuda, "cpu": cpu_name(), "cpu_count": os.cpu_count()}


def provenance(args, dev) -> dict:
    """Command, time, commit (or the source digest), versions and the device, for every stage's JSON."""
    import torch

    from worldmodel.provenance import provenance as base

    p = base()
    p["command"] = args.suite_command or "python benchmarks/gpu_suite.py " + " ".join(sys.argv[1:])
    p["commit"] = p["commit"] or os.environ.get("WORLDMODEL_COMMIT")
    p["source_digest"] = source_digest()
    try:
        import triton
        p["triton"] = triton.__version__
    except Exception:
        p["triton"] = None
    p["cuda"] = torch.version.cuda
    p["device"] = device_summary(dev)
    p["smoke"] = bool(args.smoke)
    p["env"] = {k: os.environ[k] for k in ("TRITON_INTERPRET", "KERNELS_FLEX_COMPILE", "TRITON_CACHE_DIR",
                                            "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_AUTOTUNING") if k in os.environ}
    return p


# --------------------------------------------------------------------------------------------------
# a stage's JSON, rewritten as results come in
# --------------------------------------------------------------------------------------------------
class StageWriter:
    """DIR/<stage>.json: provenance, then results as they come (rewritten atomically at each), then
    status "ok". `left()`: seconds left of the stage's time limit."""

    def __init__(self, out: Path, stage: str, args, dev):
        self.path, self.t0, self.limit, self.stall = out / f"{stage}.json", time.monotonic(), args.time_limit_s, args.stall
        self.deadline = args.deadline or time.time() + self.limit
        self.data = {"stage": stage, "status": "running", "time_limit_s": self.limit, **provenance(args, dev)}
        self.save()

    def left(self) -> float:
        """Seconds until the suite kills this stage (its start-up counted)."""
        return self.deadline - time.time()

    def save(self) -> None:
        self.data["wall_s"] = round(time.monotonic() - self.t0, 1)
        atomic_write_json(self.path, self.data)

    def row(self, key: str, row: dict, line: str | None = None) -> None:
        """Append a result to the list `key`, save, print `line` (or a short form of the row)."""
        self.data.setdefault(key, []).append(row)
        self.save()
        print(f"[{self.data['stage']} {self.limit - self.left():5.0f}/{self.limit:.0f} s] "
              + (line or json.dumps({k: v for k, v in row.items() if not isinstance(v, (list, dict))})[:220]),
              flush=True)
        if self.stall:  # test hook (--stall): hang after the first result, as a stage past its limit would
            time.sleep(3600)

    def skip_if_late(self, need_s: float, margin_s: float = 5.0) -> str | None:
        """A reason to skip an item that needs about `need_s` seconds, or None if it fits."""
        left = self.left() - margin_s
        if need_s > left:
            return f"stage time limit: about {need_s:.0f} s needed, {max(left, 0):.0f} s left"
        return None


def first_line(e: BaseException, limit: int = 200) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:limit]


def is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def raise_dynamo_limits() -> None:
    """Every variant of the engine recompiles its passes per shape and mode: keep dynamo from giving up
    (and silently running eager) part way through."""
    import torch

    for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(256, getattr(torch._dynamo.config, knob)))


def dynamo_counters() -> dict:
    from torch._dynamo.utils import counters

    return {f"{k}.{kk}"[:120]: v for k, c in counters.items() for kk, v in c.items() if isinstance(v, (int, float))}


def counters_delta(before: dict) -> dict:
    after = dynamo_counters()
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


# --------------------------------------------------------------------------------------------------
# stage: device
# --------------------------------------------------------------------------------------------------
def measure_ceilings(dev) -> dict:
    """The two ceilings METHOD.md asks for, measured: a large bf16 matrix product on random data
    (TFLOP/s) and a large device-to-device copy (GB/s, bytes read + written); medians of 10 after 3
    warm-ups. On CPU (smoke): small fp32 versions, for the code path only."""
    import statistics

    import torch

    cuda = dev.type == "cuda"
    n, dtype = (8192, torch.bfloat16) if cuda else (256, torch.float32)
    copy_bytes = 2 * 2**30 if cuda else 16 * 2**20
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    src = torch.randn(copy_bytes // 4, device=dev)
    dst = torch.empty_like(src)

    def median_s(fn) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(10):
            if cuda:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return statistics.median(times)

    mm = median_s(lambda: torch.mm(a, b))
    cp = median_s(lambda: dst.copy_(src))
    return {"matmul_tflops": 2 * n ** 3 / mm / 1e12, "matmul": f"{n}x{n}x{n} {str(dtype).replace('torch.', '')}, "
            "random data, median of 10", "copy_gbps": 2 * copy_bytes / cp / 1e9,
            "copy": f"{copy_bytes / 2**30:g} GiB device-to-device, read + write counted, median of 10"}


def stage_device(w: StageWriter, args, dev) -> None:
    import torch

    import bench_attention

    w.data["nvidia_smi_at_start"] = nvidia_smi()
    w.data["datasheet"] = bench_attention.device_peaks(w.data["device"]["name"], torch.bfloat16)
    w.save()
    c = measure_ceilings(dev)
    w.data["nvidia_smi_after"] = nvidia_smi()
    w.row("ceilings", c, f"ceilings: matmul {c['matmul_tflops']:.1f} TFLOP/s ({c['matmul']}), copy "
                         f"{c['copy_gbps']:.0f} GB/s")


def read_ceilings(out: Path) -> dict:
    """The device stage's datasheet peaks and measured ceilings ({} where it has none)."""
    try:
        d = json.loads((out / "device.json").read_text())
    except (OSError, ValueError):
        return {}
    c = (d.get("ceilings") or [{}])[0]
    return {"datasheet_tflops": (d.get("datasheet") or {}).get("tflops"),
            "datasheet_gbps": (d.get("datasheet") or {}).get("gbps"),
            "measured_tflops": c.get("matmul_tflops"), "measured_gbps": c.get("copy_gbps")}


# --------------------------------------------------------------------------------------------------
# stage: kernels (correctness against the float64 torch reference)
# --------------------------------------------------------------------------------------------------
def rel_err(got, want) -> float:
    """||got - want|| / ||want|| in float64 (NaN anywhere gives NaN, which never passes)."""
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def cache_valid(layout: str, batch: int, slots: int, t: int, device, seed: int = 0):
    """(B, slots*T) bool cache validity: "sinks_wrap" (a sink, then a partly filled window wrapped around
    the ring), "ragged" (random per key and batch entry), "full", "empty"."""
    import torch

    import bench_attention

    if layout == "sinks_wrap":
        return bench_attention.ring_valid(slots, 1, slots - 1, t, device).expand(batch, -1).contiguous()
    if layout == "ragged":
        return (torch.rand(batch, slots * t, generator=torch.Generator().manual_seed(seed)) > 0.4).to(device)
    fill = {"full": True, "empty": False}[layout]
    return torch.full((batch, slots * t), fill, dtype=torch.bool, device=device)


def kernel_cases(cuda: bool) -> tuple[list, list]:
    """Training (B, H, T, F, D) and inference (B, H, T, F, slots, D, layout) shapes. CUDA: the presets'
    (nfd-310m first); CPU: small ones with T not a multiple of the 16-blocks, for the interpreter."""
    if cuda:
        return ([(1, 16, 336, 3, 64), (2, 4, 48, 6, 64), (1, 8, 192, 4, 64)],
                [(1, 16, 336, 1, 24, 64, "sinks_wrap"), (1, 16, 336, 4, 24, 64, "sinks_wrap"),
                 (1, 16, 336, 2, 24, 64, "full"), (2, 4, 48, 2, 8, 64, "ragged"), (1, 4, 48, 2, 8, 64, "empty")])
    return ([(1, 2, 20, 3, 16)], [(1, 2, 20, 2, 4, 16, "sinks_wrap"), (2, 1, 20, 1, 4, 16, "ragged")])


def check_training(backend: str, shape, dtype, dev) -> dict:
    """Forward and backward of `backend` against the float64 reference on fresh random inputs."""
    import torch

    from worldmodel import kernels
    from worldmodel.kernels.reference import reference_block_causal_attention

    b, h, t, f, d = shape
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype)).encode()))
    q, k, v, dout = [torch.randn(b, h, t * f, d, generator=g).to(dev, dtype) for _ in range(4)]
    qr, kr, vr = [x.double().requires_grad_() for x in (q, k, v)]
    ref = reference_block_causal_attention(qr, kr, vr, t)
    ref.backward(dout.double())
    backward = not (backend == "flex" and dev.type == "cpu")  # FlexAttention has no backward on CPU
    qg, kg, vg = [x.clone().requires_grad_(backward) for x in (q, k, v)]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    with torch.set_grad_enabled(backward):
        out = kernels.block_causal_attention(qg, kg, vg, t, backend=backend)
        if backward:
            out.backward(dout)
    sync()
    row = {"first_call_s": round(time.perf_counter() - t0, 3), "rel_err": {"out": rel_err(out, ref)}}
    if backward:
        row["rel_err"].update({f"d{n}": rel_err(x.grad, xr.grad) for n, x, xr in zip("qkv", (qg, kg, vg), (qr, kr, vr))})
    else:
        row["note"] = "forward only: FlexAttention has no backward on CPU"
    if backend == "triton":  # every element written: outputs and gradients poisoned with NaN first
        from worldmodel.kernels import triton_attention as ta

        nan = lambda: torch.full_like(q, float("nan"))  # noqa: E731
        with torch.no_grad():
            o, lse = ta.block_causal_attention_fwd(q, k, v, t, out=nan())
            grads = ta.block_causal_attention_bwd(q, k, v, o, lse, dout, t, dq=nan(), dk=nan(), dv=nan())
        row["written"] = bool(all(torch.isfinite(x).all() for x in (o, *grads)))
        row["rel_err"]["out_poisoned"] = rel_err(o, ref)
    return row


def check_cached(backend: str, case, dtype, dev) -> dict:
    """Split-KV inference of `backend` against the float64 reference on fresh random inputs."""
    import torch

    from worldmodel import kernels
    from worldmodel.kernels.reference import reference_cached_attention

    b, h, t, f, slots, d, layout = case
    g = torch.Generator().manual_seed(zlib.crc32(repr((case, dtype)).encode()))
    q, k, v = [torch.randn(b, h, f * t, d, generator=g).to(dev, dtype) for _ in range(3)]
    kc, vc = [torch.randn(b, h, slots * t, d, generator=g).to(dev, dtype) for _ in range(2)]
    valid = cache_valid(layout, b, slots, t, dev, seed=1)
    ref = reference_cached_attention(*[x.double() for x in (q, k, v, kc, vc)], valid, t)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = kernels.cached_attention(q, k, v, kc, vc, valid, t, backend=backend)
    sync()
    row = {"first_call_s": round(time.perf_counter() - t0, 3), "rel_err": {"out": rel_err(out, ref)}}
    if backend == "triton":  # every element written, for one split and several
        from worldmodel.kernels import triton_attention as ta

        written = True
        with torch.no_grad():
            for ns in (1, 3):
                o = ta.cached_attention(q, k, v, kc, vc, valid, t, out=torch.full_like(q, float("nan")), num_splits=ns)
                written &= bool(torch.isfinite(o).all())
                row["rel_err"][f"out_splits{ns}"] = rel_err(o, ref)
        row["written"] = written
    return row


def autotune_picks() -> dict:
    """The config each Triton kernel's autotuner chose, per tuning key."""
    import sys as _sys

    ta = _sys.modules.get("worldmodel.kernels.triton_attention")
    if ta is None:
        return {}
    return {name: {str(key): str(cfg) for key, cfg in getattr(getattr(ta, name), "cache", {}).items()}
            for name in ("_block_causal_fwd", "_block_causal_bwd_dkdv", "_block_causal_bwd_dq", "_cached_attn_split")}


def stage_kernels(w: StageWriter, args, dev) -> None:
    import torch

    from worldmodel import kernels
    cuda = dev.type == "cuda"
    dtypes = [torch.bfloat16, torch.float16] if cuda else [torch.float32, torch.bfloat16]
    train, cached = kernel_cases(cuda)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if "triton" in kernels.available_backends(dev):
        from worldmodel.kernels import triton_attention as ta

        w.data["autotune_tiles"] = {"fwd": ta.FWD_TILES, "bwd_dkdv": ta.BWD_DKDV_TILES, "bwd_dq": ta.BWD_DQ_TILES,
                                    "split": ta.SPLIT_TILES, "note": "(BLOCK_M, BLOCK_N, num_warps, num_stages)"}
    w.data["tolerance"] = {"rel_err": REL_TOL, "note": "||out - ref|| / ||ref||, reference in float64"}
    # on a GPU the Triton kernels first (what this suite is for); in the interpreter they are the slow ones
    for backend in ("triton", "sdpa", "flex") if cuda else ("sdpa", "flex", "triton"):
        for dtype in dtypes:
            dname = str(dtype).replace("torch.", "")
            items = [("train", s) for s in train] + [("cached", c) for c in cached]
            for i, (kind, shape) in enumerate(items):
                row = {"backend": backend, "dtype": dname, "kind": kind, "shape": list(shape)}
                try:
                    kernels.check_backend(backend, dev)
                    reason = None
                except RuntimeError as e:
                    reason = str(e)
                if reason is None and backend == "triton" and interpret and dtype == torch.bfloat16:
                    reason = "the Triton interpreter computes garbage for bf16 (checked on CUDA)"
                if reason is None and backend == "flex" and cuda and shape not in (train[0], cached[0], cached[1]):
                    reason = "flex: nfd-310m shapes only (each shape compiles for seconds)"
                if reason is None and backend == "flex" and args.smoke:
                    reason = "CPU smoke: the same comparison as sdpa's; FlexAttention is checked on the GPU"
                reason = reason or w.skip_if_late(30 if i == 0 else 5)
                if reason:
                    w.row("results", {**row, "skipped": reason}, f"{backend} {dname} {kind} {shape}: skipped ({reason})")
                    continue
                try:
                    row.update((check_training if kind == "train" else check_cached)(backend, shape, dtype, dev))
                except Exception as e:  # a failing backend is recorded, and the others still run
                    row.update(ok=False, error=first_line(e))
                    w.row("results", row, f"{backend} {dname} {kind} {shape}: ERROR {row['error']}")
                    free_memory()
                    continue
                errs = row["rel_err"]
                row["ok"] = bool(all(e <= REL_TOL[dname] for e in errs.values()) and row.get("written", True))
                if backend == "triton":
                    w.data["autotune_picks"] = autotune_picks()
                worst = max(errs, key=lambda k: errs[k] if errs[k] == errs[k] else math.inf)
                w.row("results", row, f"{backend} {dname} {kind} {shape}: {'ok' if row['ok'] else 'FAIL'} "
                                      f"(worst {worst} {errs[worst]:.1e}, first call {row['first_call_s']:.2f} s"
                                      + (f", written {row['written']}" if "written" in row else "") + ")")
    rows = [r for r in w.data.get("results", []) if "ok" in r]
    w.data["passed"], w.data["failed"] = sum(r["ok"] for r in rows), sum(not r["ok"] for r in rows)


# --------------------------------------------------------------------------------------------------
# stage: attention (benchmarks/bench_attention.py)
# --------------------------------------------------------------------------------------------------
def stage_attention(args, dev, out: Path) -> None:
    import bench_attention

    left = (args.deadline or time.time() + args.time_limit_s) - time.time()
    argv = ["--out", str(out / "attention.json")]
    if dev.type == "cuda":
        argv += ["--presets", "nfd-310m", "tiny", "--frames", "1", "2", "4", "--time-limit-s", f"{max(left - 25, 1):.0f}"]
    else:  # the interpreter takes ~10 s a call at the tiny shape: the Triton kernels are checked by `kernels`
        argv += ["--presets", "tiny", "--frames", "2", "--kinds", "cached", "train_fwd", "--backends", "sdpa", "flex",
                 "--repeats", "3",
                 "--budget-s", "0.05", "--threads", "1", "--time-limit-s", f"{max(left - 10, 1):.0f}"]
    meta = {"stage": "attention", **provenance(args, dev), "stage_time_limit_s": args.time_limit_s}
    meta["bench_command"] = "python benchmarks/bench_attention.py " + " ".join(argv)
    bench_attention.main(argv, meta=meta)


# --------------------------------------------------------------------------------------------------
# stage: engine
# --------------------------------------------------------------------------------------------------
def stage_engine(w: StageWriter, args, dev) -> None:
    from worldmodel import kernels
    from worldmodel.device import memory_kind
    from worldmodel.evaluation import timing, traces
    from worldmodel.inference.engine import WorldModel

    raise_dynamo_limits()
    smoke = args.smoke
    preset = "tiny" if smoke else "nfd-310m"
    frames, rollout, warmup = (8, 24, 2) if smoke else (300, 2000, 20)
    # smoke: a shrunken tiny model, for the code path on a CPU
    shrink = dict(dim=64, depth=2, heads=2, ae_channels=(8, 16, 32, 64), ae_res_blocks=(0, 0, 0, 0), window_frames=3,
                  max_draft=4) if smoke else None
    wm = WorldModel.from_preset(preset, device=dev, cfg_overrides=shrink)
    trace, trace_src = traces.load_trace(None, rollout + 200)
    attention = wm.attention
    w.data.update(model={"preset": preset, "random_weights": True, "frame_size": list(wm.cfg.frame_size),
                         "tokens_per_frame": wm.cfg.tokens_per_frame, "dim": wm.cfg.dim, "depth": wm.cfg.depth,
                         "heads": wm.cfg.heads, "cache_frames": wm.cfg.cache_frames,
                         "transformer_params": sum(p.numel() for p in wm.transformer.parameters())},
                  trace={"source": trace_src, **traces.trace_summary(trace[:rollout], wm.speculative_tolerance)},
                  engine_settings=timing.extra_settings(wm), smoke_overrides=shrink, frames=frames, rollout_frames=rollout,
                  warmup_frames=warmup, memory=memory_kind(dev))
    w.save()
    per_frame_s: dict = {}  # (compile mode, attention) -> seconds a frame at 4 steps, as measured
    compile_s: dict = {}    # compile mode -> warm-up seconds of its first item (compilation)
    fast = {"compile": False, "attention": attention}  # what the later items build on: the compiled engine once it ran

    def plan():
        yield "eager", {"compile": False}, frames
        yield "compiled (inductor + CUDA graphs)", {"compile": True}, frames
        if not fast["compile"] and attention != "sdpa":  # compiling around the Triton kernels failed: try SDPA
            yield "compiled (inductor + CUDA graphs), attention sdpa", {"compile": True, "attention": "sdpa"}, frames
        yield f"rollout of {rollout} frames", dict(fast), rollout
        for s in (1, 2, 3):
            yield f"{s} step{'s' * (s > 1)}", {**fast, "steps": s}, frames
        for n in (2, 4):
            yield f"speculative {n}", {**fast, "speculative": n}, frames
        yield "CUDA graphs without inductor", {**fast, "compile": "graphs"}, frames
        yield "inductor without CUDA graphs", {**fast, "compile": "inductor"}, frames
        for b in ("sdpa", "flex", "triton"):  # (not the Triton interpreter on a CPU)
            if b != fast["attention"] and b in kernels.available_backends(dev) and not (b == "triton" and not cuda):
                yield f"attention {b}", {**fast, "attention": b}, frames

    cuda = dev.type == "cuda"
    for label, change, n in plan():
        settings = {"steps": 4, "speculative": 1, "attention": attention, "compile": False, **change}
        mode = settings["compile"]
        row = {"item": label, "settings": settings}
        per = per_frame_s.get((mode, settings["attention"])) or per_frame_s.get((False, attention)) or 0.05
        new_shapes = mode not in compile_s or settings["speculative"] > 1
        need = (n + warmup) * per * settings["steps"] / 4 + (compile_s.get(True, 60.0) if mode and new_shapes else 0)
        reason = ("CPU smoke: compiling takes minutes on a CPU (measured on the GPU)" if smoke and mode
                  else "CPU smoke: the other backends are measured on the GPU" if smoke and label.startswith("attention")
                  else w.skip_if_late(need))
        if reason:
            w.row("results", {**row, "status": f"skipped: {reason}"}, f"{label}: skipped ({reason})")
            continue
        before = dynamo_counters()
        try:
            try:
                timing.apply_settings(wm, settings)
            except Exception as e:  # a setting this engine or device does not offer
                raise RuntimeError(f"unavailable: {first_line(e)}") from None
            # a full warm-up where new shapes compile (a new mode; drafts), a short one where they are compiled
            warm = warmup if mode not in compile_s or settings["speculative"] > 1 else max(5, warmup // 4)
            r = timing.measure(wm, trace, n, warm)
        except Exception as e:  # recorded; the next item still runs
            w.row("results", {**row, "status": f"failed: {first_line(e)}", "dynamo": counters_delta(before)},
                  f"{label}: FAILED {first_line(e)}")
            try:
                wm.compile = False
            except Exception:
                pass
            free_memory()
            continue
        compile_s.setdefault(mode, r["warmup_s"])
        if settings["steps"] == 4 and settings["speculative"] == 1:
            per_frame_s.setdefault((mode, settings["attention"]), r["total_s"] / n)
            if mode is True and not fast["compile"]:
                fast.update(compile=True, attention=settings["attention"])
        r["by_rollout_length"] = timing.rollout_bins(r["latency_ms_per_frame"], wm.cfg.cache_frames)
        lat = r["latency_ms"]
        w.row("results", {**row, **r, "dynamo": counters_delta(before)},
              f"{label}: {r['fps']:.1f} frames/s, p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms, warm-up "
              f"{r['warmup_s']:.1f} s" + (f", acceptance {r['acceptance_rate']:.2f}" if r.get("acceptance_rate") else ""))
        wm.compile = False
    del wm
    free_memory()


# --------------------------------------------------------------------------------------------------
# stage: training
# --------------------------------------------------------------------------------------------------
def train_flops(cfg, batch: int, frames: int) -> dict:
    """FLOPs of one training step of the transformer on `batch` clips of `frames` frames.

    One forward of the real model on the meta device under FlopCounterMode (every matrix product, with the
    attention as the torch reference computes it: all L^2 query-key pairs), then the attention replaced by
    its visible block-causal pairs (4*D each: scores and values), times 3 for forward + backward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from worldmodel.model.transformer import WorldTransformer

    with torch.device("meta"):
        model = WorldTransformer(cfg)
    model.attention = "torch"
    h, w = cfg.latent_size
    x = torch.empty(batch, frames, cfg.latent_channels, h, w, device="meta")
    t, a = torch.empty(batch, frames, device="meta"), torch.empty(batch, frames, cfg.action_dim, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, a)
    counted = counter.get_total_flops()
    T, L = cfg.tokens_per_frame, cfg.tokens_per_frame * frames
    per_pair = 4 * cfg.head_dim * cfg.heads * cfg.depth * batch
    dense, visible = per_pair * L * L, per_pair * T * T * frames * (frames + 1) // 2
    if counted < dense:
        raise RuntimeError(f"FlopCounterMode counted {counted} FLOPs, less than the dense attention alone ({dense})")
    forward = counted - dense + visible
    return {"forward_counted": counted, "attention_dense": dense, "attention_visible": visible,
            "forward": forward, "train_step": 3 * forward,
            "method": "FlopCounterMode over one forward on the meta device, attention counted for the visible "
                      "block-causal query-key pairs (4*D each), x3 for forward + backward; no recomputation, "
                      "norms or elementwise work counted"}


def find_batch(try_batch, candidates) -> tuple[int | None, list[dict]]:
    """The largest of `candidates` (tried from the largest down) for which `try_batch(b)` does not run out
    of memory, and what each try did. Errors other than out-of-memory propagate."""
    tried = []
    for b in sorted(candidates, reverse=True):
        t0 = time.perf_counter()
        try:
            r = try_batch(b)
        except Exception as e:
            if not is_oom(e):
                raise
            tried.append({"batch": b, "fits": False, "error": first_line(e, 120)})
            del e
            free_memory()
            continue
        tried.append({"batch": b, "fits": True, "s": round(time.perf_counter() - t0, 2),
                      **({"clips_per_s": r["clips_per_s"]} if isinstance(r, dict) and "clips_per_s" in r else {})})
        return b, tried
    return None, tried


def profile_step(cfg, batch: int, dev, compile: bool, frames: int) -> dict:
    """Where a training step's time goes: two steps under torch.profiler (after two untimed ones): the
    kernels by device time, the host ops by CPU time, and how busy the device was."""
    from torch.profiler import ProfilerActivity, profile, schedule

    from worldmodel.training.train_cli import measure_throughput

    cuda = dev.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts, schedule=schedule(wait=1, warmup=1, active=2)) as prof:
        r = measure_throughput(cfg, batch, steps=2, warmup=2, device=str(dev), compile=compile, amp=True,
                               clip_frames=frames, on_step=lambda i: prof.step())
    ev = prof.key_averages()

    def dev_us(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0

    wall_us = 2 * r["step_s_median"] * 1e6
    # the device's own events (kernels, copies): an op's row also carries its kernels' time, so not those
    on_device = [e for e in ev if "CUDA" in str(getattr(e, "device_type", ""))
                 or (dev_us(e) > 0 and e.self_cpu_time_total == 0)] if cuda else []
    top = sorted(on_device, key=dev_us, reverse=True)[:12]
    busy = sum(dev_us(e) for e in on_device) / wall_us if cuda else None
    host = sorted(ev, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    return {"compile": compile, "batch": batch, "step_s": r["step_s_median"], "device_busy_fraction": busy,
            "top_device_kernels": [{"name": e.key[:100], "ms_per_step": dev_us(e) / 2e3, "calls": e.count // 2,
                                    "share_of_step": dev_us(e) / wall_us} for e in top],
            "top_host_ops": [{"name": e.key[:100], "ms_per_step": e.self_cpu_time_total / 2e3} for e in host]}


def stage_training(w: StageWriter, args, dev) -> None:
    import torch

    from worldmodel.training.config import resolve_config
    from worldmodel.training.train_cli import measure_throughput

    smoke, cuda = args.smoke, dev.type == "cuda"
    raise_dynamo_limits()
    peaks = read_ceilings(Path(args.out))
    if not peaks.get("datasheet_tflops") and cuda:
        import bench_attention

        peaks["datasheet_tflops"] = bench_attention.device_peaks(torch.cuda.get_device_name(dev), torch.bfloat16)["tflops"]
    w.data["peaks"] = peaks
    # smoke: shrunken models and clips, for the code path on a CPU
    shrink = {"depth": 1, "dim": 128, "window_frames": 2, "max_draft": 1} if smoke else {}
    presets = {"tiny": [1024, 512, 256, 128, 64, 32], "small": [256, 128, 64, 32, 16, 8]}
    if smoke:
        presets = {"tiny": [4, 2], "small": [1]}
    steps, warm = (2, 1) if smoke else (10, 3)
    cfgs = {name: resolve_config(name, shrink) for name in presets}
    flops = {name: train_flops(cfg, 1, cfg.clip_frames) for name, cfg in cfgs.items()}
    w.data["flops_per_clip"] = {name: {k: (v if isinstance(v, str) else int(v)) for k, v in f.items()}
                                for name, f in flops.items()}
    w.data["smoke_overrides"] = shrink
    batch: dict = {}

    def record(name, r, label):
        cfg = cfgs[name]
        step_flops = flops[name]["train_step"] * r["batch"]
        tflops = step_flops / r["step_s_median"] / 1e12
        row = {"preset": name, "item": label, **r, "flops_per_step": step_flops, "tflops": tflops,
               "mfu_datasheet": tflops / peaks["datasheet_tflops"] if peaks.get("datasheet_tflops") else None,
               "mfu_measured_ceiling": tflops / peaks["measured_tflops"] if peaks.get("measured_tflops") else None,
               "peak_memory_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None,
               "clip_frames": cfg.clip_frames}
        mfu = row["mfu_datasheet"]
        w.row("results", row, f"{name} {label}: batch {r['batch']}, {r['clips_per_s']:.1f} clips/s, {tflops:.2f} "
                              f"TFLOP/s" + (f", MFU {100 * mfu:.1f}% of the datasheet peak" if mfu else ""))

    def measure(name, label, compile, device_data=False, est=None):
        if name not in batch:
            return
        need = est if est is not None else (60 if compile and not smoke else 10)
        reason = ("CPU smoke: compiling takes minutes on a CPU (measured on the GPU)" if smoke and compile
                  else w.skip_if_late(need))
        if reason:
            w.row("results", {"preset": name, "item": label, "skipped": reason}, f"{name} {label}: skipped ({reason})")
            return
        b = batch[name]
        while b >= 1:
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
            try:
                r = measure_throughput(cfgs[name], b, steps=steps, warmup=warm, device=str(dev), compile=compile,
                                       amp=True, device_data=device_data)
                record(name, r, label)
                return
            except Exception as e:
                if not is_oom(e):
                    w.row("results", {"preset": name, "item": label, "batch": b, "error": first_line(e)},
                          f"{name} {label}: ERROR {first_line(e)}")
                    free_memory()
                    return
                del e
                free_memory()
                b //= 2  # compiled graphs can hold other buffers than the eager probe: halve and retry

    for name, cands in presets.items():  # 1. the batch that fits (eager steps), then compiled throughput
        reason = w.skip_if_late(15)
        if reason:
            w.row("batch_search", {"preset": name, "skipped": reason}, f"{name}: batch search skipped ({reason})")
            continue
        b, tried = find_batch(lambda bb: measure_throughput(cfgs[name], bb, steps=1, warmup=0, device=str(dev),
                                                            amp=True), cands)
        w.row("batch_search", {"preset": name, "batch": b, "tried": tried},
              f"{name}: batch {b} fits (tried {[t['batch'] for t in tried]})")
        if b is not None:
            batch[name] = b
            measure(name, "bf16 + compile", compile=True)
    for name in presets:  # 2. what compile gains, and the device's work alone
        measure(name, "bf16 eager", compile=False)
    measure("tiny", "bf16 + compile, data drawn on the device", compile=True, device_data=True, est=30)
    if "tiny" in batch:  # 3. where the time goes
        reason = w.skip_if_late(40 if cuda else 5)
        if reason:
            w.row("profile", {"preset": "tiny", "skipped": reason}, f"tiny profile: skipped ({reason})")
        else:
            try:
                p = profile_step(cfgs["tiny"], batch["tiny"], dev, compile=cuda, frames=cfgs["tiny"].clip_frames)
                w.row("profile", {"preset": "tiny", **p},
                      "tiny profile: device busy " + (f"{100 * p['device_busy_fraction']:.0f}%" if p["device_busy_fraction"]
                                                       is not None else "n/a") + f", step {p['step_s']:.3f} s")
            except Exception as e:
                w.row("profile", {"preset": "tiny", "error": first_line(e)}, f"tiny profile: ERROR {first_line(e)}")


# --------------------------------------------------------------------------------------------------
# one stage, in its own process
# --------------------------------------------------------------------------------------------------
def stage_main(args) -> int:
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:  # the Triton kernels run in the interpreter on a CPU: set before triton is first imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
        if args.smoke:
            os.environ.setdefault("KERNELS_FLEX_COMPILE", "0")  # eager FlexAttention: no compile per shape
            torch.set_num_threads(1)
    dev = torch.device("cuda" if cuda else "cpu")
    out = Path(args.out)
    if args.stage == "attention":
        stage_attention(args, dev, out)
        return 0
    w = StageWriter(out, args.stage, args, dev)
    try:
        {"device": stage_device, "kernels": stage_kernels, "engine": stage_engine,
         "training": stage_training}[args.stage](w, args, dev)
    except BaseException as e:
        w.data["status"] = "failed"
        w.data["error"] = first_line(e, 500)
        w.data["traceback"] = traceback.format_exc()[-4000:]
        w.save()
        raise
    w.data["status"] = "ok"
    w.save()
    return 0


# --------------------------------------------------------------------------------------------------
# the suite: every stage under its limit, then the summary
# --------------------------------------------------------------------------------------------------
def run_stage(name: str, limit: float, args, log) -> dict:
    """Run one stage in a new process group; kill the group at `limit` seconds. Its output goes to the
    console and the log. Returns what the parent knows: status, wall time, return code."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--out", str(args.out),
           "--time-limit-s", f"{limit:.1f}", "--deadline", f"{time.time() + limit:.1f}",
           "--suite-command", args.suite_command]
    cmd += ["--smoke"] if args.smoke else []
    cmd += ["--stall"] if args.stall == name else []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    # its own process group (killed whole at the limit: inductor's compile workers too), in this session (so
    # that whoever stops the suite's session stops the stages too)
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", **group)
    tail: list[str] = []

    def pump():
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            log.flush()
            tail.append(line)
            del tail[:-40]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    status = None
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        status = "timed_out"
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (sigterm_unwinds): stop the stage too
        status = "interrupted"
    if status:
        kill_group(proc)
    reader.join(timeout=5)
    rc = proc.returncode
    wall = time.monotonic() - t0
    if status is None:
        status = "ok" if rc == 0 else "failed"
    rec = {"status": status, "wall_s": round(wall, 1), "limit_s": round(limit, 1), "returncode": rc}
    if status == "failed":
        rec["output_tail"] = "".join(tail[-20:])[-3000:]
    return rec


def kill_group(proc) -> None:
    """SIGTERM to the stage's process group, then SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def merge_stage_json(out: Path, name: str, rec: dict) -> dict:
    """The stage's own JSON (whatever it wrote before it ended) with the parent's verdict on top."""
    path = out / f"{name}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {"stage": name}
    if rec["status"] == "ok" and data.get("status") not in (None, "ok"):
        rec["status"] = "failed"  # exited 0 without finishing its JSON
    data.update(status=rec["status"], suite={k: v for k, v in rec.items() if k != "status"})
    atomic_write_json(path, data)
    return data


def headlines(out: Path, names) -> dict:
    """The figures a reader wants first, from this run's stage JSONs."""
    def load(name):
        if name not in names:
            return {}
        try:
            return json.loads((out / f"{name}.json").read_text())
        except (OSError, ValueError):
            return {}

    h: dict = {}
    dev = load("device")
    if dev:
        h["device"] = {"name": (dev.get("device") or {}).get("name"), "driver": (dev.get("device") or {}).get("driver"),
                       "datasheet": dev.get("datasheet"), "ceilings": (dev.get("ceilings") or [None])[0]}
    ker = load("kernels")
    if ker:
        rows = [r for r in ker.get("results", []) if "ok" in r]
        h["kernels"] = {"passed": sum(r["ok"] for r in rows), "failed": sum(not r["ok"] for r in rows),
                        "failures": [{k: r.get(k) for k in ("backend", "dtype", "kind", "shape", "rel_err", "error")}
                                     for r in rows if not r["ok"]][:10],
                        "triton_first_call_s_max": max((r["first_call_s"] for r in rows
                                                        if r["backend"] == "triton" and "first_call_s" in r), default=None)}
    att = load("attention")
    if att:
        rows = [r for r in att.get("results", []) if "ms" in r]
        table = {}
        for r in rows:
            key = (r["preset"], r["kind"], r["F"], r.get("cache_valid_frames"))
            table.setdefault(key, {})[r["backend"]] = r
        cmp = []
        for (preset, kind, f, valid), by in table.items():
            tri = by.get("triton")
            others = {b: by[b]["ms"] for b in ("sdpa", "flex") if b in by}
            cmp.append({"preset": preset, "kind": kind, "F": f, "cache_valid_frames": valid,
                        "ms": {b: r["ms"] for b, r in by.items()},
                        "sdpa_kernels": (by.get("sdpa") or {}).get("sdpa_kernels"),
                        "triton_speedup_vs_best_other": (min(others.values()) / tri["ms"]) if tri and others else None,
                        "triton_tflops": tri["tflops"] if tri else None, "triton_gbps": tri["gbps"] if tri else None})
        h["attention"] = cmp
    eng = load("engine")
    if eng:
        items = []
        for r in eng.get("results", []):
            item = {"item": r["item"], "status": r.get("status")}
            if r.get("status") == "ok":
                item.update(fps=r["fps"], p50_ms=r["latency_ms"]["p50"], p99_ms=r["latency_ms"]["p99"],
                            warmup_s=r["warmup_s"], acceptance=r.get("acceptance_rate"))
                bins = r.get("by_rollout_length") or []
                full = [b for b in bins if b["frames"][0] > eng.get("model", {}).get("cache_frames", 0)]
                if "rollout" in r["item"] and len(full) >= 2:  # flat: the last bin's median latency against the first after the cache is full
                    item["late_vs_early_p50"] = full[-1]["p50_ms"] / full[0]["p50_ms"]
            items.append(item)
        h["engine"] = items
    tr = load("training")
    if tr:
        h["training"] = [{k: r.get(k) for k in ("preset", "item", "batch", "clips_per_s", "tflops", "mfu_datasheet",
                                                "mfu_measured_ceiling", "skipped", "error")}
                         for r in tr.get("results", [])]
        prof = (tr.get("profile") or [{}])[0]
        if "device_busy_fraction" in prof:
            h["training_profile"] = {"device_busy_fraction": prof["device_busy_fraction"],
                                     "top_kernels": [k["name"] for k in prof.get("top_device_kernels", [])[:5]]}
    return h


def write_summary(out: Path, summary: dict) -> None:
    summary["headlines"] = headlines(out, list(summary["limits_s"]))
    atomic_write_json(out / SUMMARY, summary)


def plot_summary(out: Path, summary: dict) -> None:
    """One PNG of four panels: attention times, engine latency against rollout length, engine frames/s,
    training MFU. A panel without data says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = summary.get("headlines", {})
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    (aa, ab), (ac, ad) = axes

    def empty(ax, what):
        st = summary["stages"].get(what, {}).get("status", "not run")
        ax.text(0.5, 0.5, f"{what}: no data ({st})", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])

    # the steady state (a full cache) and training; the cache filling up is in the JSON
    att = [a for a in h.get("attention") or [] if a["kind"] != "cached" or a["cache_valid_frames"] == max(
        b["cache_valid_frames"] for b in h["attention"] if b["preset"] == a["preset"] and b["kind"] == "cached")]
    if att:
        labels = [f"{a['preset']} {a['kind']}\nF={a['F']} cache {a['cache_valid_frames'] or '-'}" for a in att]
        backends = sorted({b for a in att for b in a["ms"]})
        width = 0.8 / max(len(backends), 1)
        for i, b in enumerate(backends):
            aa.bar([j + i * width for j in range(len(att))], [a["ms"].get(b, 0) for a in att], width, label=b)
        aa.set_xticks([j + 0.4 - width / 2 for j in range(len(att))], labels, rotation=60, fontsize=6, ha="right")
        aa.set_yscale("log")
        aa.set_ylabel("ms per call")
        aa.legend(fontsize=8)
        aa.set_title("attention: time per call (lower is better)", fontsize=10)
    else:
        empty(aa, "attention")
    eng = json.loads((out / "engine.json").read_text()) if (out / "engine.json").exists() else {}
    ok = [r for r in eng.get("results", []) if r.get("status") == "ok"]
    if ok:
        for i, r in enumerate(ok):
            lat = r["latency_ms_per_frame"]
            k = max(1, min(15, len(lat) // 20))
            smooth = [sum(lat[max(0, j - k):j + k + 1]) / len(lat[max(0, j - k):j + k + 1]) for j in range(len(lat))]
            ab.plot(range(1, len(lat) + 1), smooth, lw=2 if "rollout" in r["item"] else 1, label=r["item"],
                    color=f"C{i % 10}")
        ab.axvline(eng.get("model", {}).get("cache_frames", 0), ls="--", color="grey")
        ab.set_xscale("log")
        ab.set_xlabel("rollout length (frames since reset)")
        ab.set_ylabel("latency per frame, running mean (ms)")
        ab.legend(fontsize=6)
        ab.set_title(f"engine: {eng.get('model', {}).get('preset')} latency against rollout length", fontsize=10)
        ac.bar(range(len(ok)), [r["fps"] for r in ok], color=[f"C{i % 10}" for i in range(len(ok))])
        for i, r in enumerate(ok):
            ac.text(i, r["fps"], f"{r['fps']:.0f}", ha="center", va="bottom", fontsize=7)
        ac.set_xticks(range(len(ok)), [r["item"] for r in ok], rotation=45, ha="right", fontsize=7)
        ac.set_ylabel("frames / s")
        ac.set_title("engine: frames/s", fontsize=10)
    else:
        empty(ab, "engine")
        empty(ac, "engine")
    tr = [r for r in h.get("training") or [] if r.get("clips_per_s")]
    if tr:
        vals = [100 * (r["mfu_datasheet"] or 0) for r in tr]
        ad.bar(range(len(tr)), vals if any(vals) else [r["tflops"] for r in tr])
        ad.set_xticks(range(len(tr)), [f"{r['preset']} {r['item']}\nbatch {r['batch']}" for r in tr], rotation=30,
                      ha="right", fontsize=7)
        ad.set_ylabel("MFU, % of the datasheet's dense bf16 peak" if any(vals) else "TFLOP/s (no datasheet peak)")
        ad.set_title("training throughput", fontsize=10)
    else:
        empty(ad, "training")
    dev = (h.get("device") or {}).get("name") or "?"
    fig.suptitle(f"GPU suite on {dev}, commit {str(summary.get('commit') or summary.get('source_digest'))[:12]}",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(out / PLOT, dpi=100)
    plt.close(fig)


def print_headlines(summary: dict) -> None:
    h = summary.get("headlines", {})
    print("\n== GPU suite ==")
    for name, rec in summary["stages"].items():
        print(f"  {name:10} {rec['status']:10} {rec.get('wall_s', 0):6.1f} s of {rec.get('limit_s', 0):.0f}")
    d = h.get("device") or {}
    if d:
        c = d.get("ceilings") or {}
        ds = d.get("datasheet") or {}
        print(f"device: {d.get('name')} driver {d.get('driver')}; datasheet {ds.get('tflops')} TFLOP/s, "
              f"{ds.get('gbps')} GB/s; measured " + (f"{c['matmul_tflops']:.0f} TFLOP/s, {c['copy_gbps']:.0f} GB/s"
                                                     if c else "n/a"))
    if h.get("kernels"):
        k = h["kernels"]
        print(f"kernels: {k['passed']} passed, {k['failed']} failed; Triton first call at most "
              f"{k['triton_first_call_s_max']} s")
    for a in h.get("attention") or []:
        ms = ", ".join(f"{b} {v:.4f}" for b, v in sorted(a["ms"].items()))
        sp = a["triton_speedup_vs_best_other"]
        print(f"attention {a['preset']:8} {a['kind']:13} F={a['F']} cache {a['cache_valid_frames'] or '-'}: ms {ms}"
              + (f"; triton x{sp:.2f} vs the better other" if sp else ""))
    for e in h.get("engine") or []:
        if e["status"] == "ok":
            print(f"engine {e['item']:36} {e['fps']:8.1f} frames/s  p50 {e['p50_ms']:7.2f} ms  p99 {e['p99_ms']:7.2f} ms"
                  + (f"  late/early p50 {e['late_vs_early_p50']:.2f}" if e.get("late_vs_early_p50") else ""))
        else:
            print(f"engine {e['item']:36} {e['status']}")
    for t in h.get("training") or []:
        if t.get("clips_per_s"):
            mfu = t.get("mfu_datasheet")
            print(f"training {t['preset']:5} {t['item']:42} batch {t['batch']:5} {t['clips_per_s']:9.1f} clips/s "
                  f"{t['tflops']:8.2f} TFLOP/s" + (f"  MFU {100 * mfu:.1f}%" if mfu else ""))
        else:
            print(f"training {t['preset']:5} {t['item']:42} {t.get('skipped') or t.get('error')}")


def run_suite(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    asked = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else list(STAGES)
    bad = [s for s in asked if s not in STAGES]
    names = [s for s in STAGES if s in asked]  # always in suite order
    if bad:
        print(f"gpu_suite: unknown stage(s) {', '.join(bad)}; choose from {', '.join(STAGES)}", file=sys.stderr)
        return 2
    limits = dict(STAGES)
    for spec in args.limit or []:
        name, _, value = spec.partition("=")
        try:
            if name not in STAGES:
                raise ValueError
            limits[name] = float(value)
        except ValueError:
            print(f"gpu_suite: --limit wants STAGE=SECONDS with STAGE one of {', '.join(STAGES)}, got {spec!r}",
                  file=sys.stderr)
            return 2
    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    summary = {"suite": "gpu", "status": "running", "command": args.suite_command,
               "commit": commit or os.environ.get("WORLDMODEL_COMMIT"), "source_digest": source_digest(),
               "budget_s": args.budget_s, "limits_s": {n: limits[n] for n in names}, "smoke": args.smoke,
               "files": [f"{n}.json" for n in names] + [SUMMARY, PLOT, LOG], "stages": {}}
    for name in names:  # a stage's JSON is this run's or none: no stale file from an earlier run in the folder
        (out / f"{name}.json").unlink(missing_ok=True)
    t0 = time.monotonic()
    interrupted = False
    with open(out / LOG, "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {args.suite_command}\n")
        for name in names:
            left = args.budget_s - (time.monotonic() - t0)
            limit = min(limits[name], left)
            if interrupted or limit < min(MIN_STAGE_S, limits[name]):
                why = "interrupted" if interrupted else f"total budget spent ({max(left, 0):.0f} s left)"
                rec = {"status": "skipped", "reason": why}
                atomic_write_json(out / f"{name}.json", {"stage": name, "status": "skipped", "reason": why})
            else:
                print(f"\n=== stage {name} (limit {limit:.0f} s, {left:.0f} s of the budget left)", flush=True)
                log.write(f"=== stage {name} (limit {limit:.0f} s)\n")
                rec = run_stage(name, limit, args, log)
                merge_stage_json(out, name, rec)
                interrupted = rec["status"] == "interrupted"
                print(f"=== stage {name}: {rec['status']} after {rec['wall_s']} s", flush=True)
            summary["stages"][name] = rec
            summary["wall_s"] = round(time.monotonic() - t0, 1)
            write_summary(out, summary)
            try:
                plot_summary(out, summary)
            except Exception as e:  # the plot is a view of the JSON: never lose the JSON for it
                summary["plot_error"] = first_line(e)
    statuses = [r["status"] for r in summary["stages"].values()]
    summary["status"] = "interrupted" if interrupted else ("ok" if all(s == "ok" for s in statuses) else "incomplete")
    write_summary(out, summary)
    print_headlines(summary)
    print(f"\nwrote {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
    return 130 if interrupted else (0 if summary["status"] == "ok" else 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Stages and outputs: see the module docstring (benchmarks/gpu_suite.py).")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default: $OUT)")
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                    help=f"total time budget in seconds (default {DEFAULT_BUDGET_S})")
    ap.add_argument("--limit", action="append", metavar="STAGE=S",
                    help="a stage's own time limit in seconds (defaults: "
                         + ", ".join(f"{k} {v}" for k, v in STAGES.items()) + ")")
    ap.add_argument("--stages", help=f"comma-separated subset, in suite order (default: {','.join(STAGES)})")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, for a CPU: checks the suite, measures nothing")
    ap.add_argument("--digest", action="store_true", help="print the source digest the JSONs record, and exit")
    ap.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)  # internal: run one stage
    ap.add_argument("--time-limit-s", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # epoch s of the kill
    ap.add_argument("--suite-command", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--stall", nargs="?", const=True, default=None, help=argparse.SUPPRESS)  # test hook
    args = ap.parse_args(argv)
    if args.digest:
        print(source_digest())
        return 0
    if not args.out:
        print("gpu_suite: no output folder: pass --out DIR or set OUT", file=sys.stderr)
        return 2
    args.suite_command = args.suite_command or os.environ.get("GPU_SUITE_COMMAND") or (
        "python benchmarks/gpu_suite.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)))
    if args.stage:
        return stage_main(args)
    if args.budget_s <= 0:
        print(f"gpu_suite: --budget-s must be positive, got {args.budget_s:g}", file=sys.stderr)
        return 2
    from worldmodel.errors import sigterm_unwinds

    with sigterm_unwinds():  # `kill PID` stops the running stage and keeps what was written, like Ctrl-C
        return run_suite(args)


if __name__ == "__main__":
    sys.exit(main())
