"""Benchmark block-causal frame attention: Triton kernels vs SDPA (explicit mask) vs two GEMMs (matmul) vs
FlexAttention.

Shapes are the presets' (tiny / small / nfd-310m): inference (``cached_attention``, F = 1, 4, 8 new frames
against a static cache of sink + window slots with 1 frame valid up to the full window, valid slots wrapped
around the ring) and training (``block_causal_attention`` over a whole clip, forward and forward+backward).

Prints ms, achieved TFLOP/s and GB/s beside the device's datasheet peaks, and writes JSON under benchmarks/
(device, git commit, command), rewritten after every case. FLOPs count only the unmasked score/value
products (4*D per visible query-key pair; backward = 2.5x forward). Bytes = q, k, v, out (+ do, dq, dk, dv
for the backward) + the whole static cache buffer (k and v) that every backend reads.

On CUDA a case is timed from replays of a CUDA graph of the calls (device time without launch gaps; eager
back-to-back calls where a backend cannot be captured, and said so), over as many input sets, used in turn,
as make twice the L2 cache, so that the inputs come from memory; `ms_eager` is the same calls made eagerly
(Python and launch overhead included), `first_call_ms` the first call (compile, autotune). For SDPA the
kernel PyTorch dispatched to (flash, efficient, cudnn or math) is recorded. Cases run in order of interest
(each preset's inference at a full cache first), and `--time-limit-s` stops starting new ones.

    python benchmarks/bench_attention.py                  # all presets, defaults for this device
    python benchmarks/bench_attention.py --presets tiny --backends sdpa triton --dtype bf16

On CPU: triton runs only if TRITON_INTERPRET=1 is set (and then only at the tiny shape: the interpreter
measures nothing useful about the kernels); compiled flex runs at the tiny shape only (each new shape costs
seconds of compile) unless --flex-all; the nfd-310m training shape is skipped unless --cpu-full.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from worldmodel import kernels  # noqa: E402
from worldmodel.files import atomic_write_json  # noqa: E402

# T = tokens per frame, H heads, D head dim, cache = sink + window frame slots, clip = training clip frames
PRESETS = {
    "tiny": dict(T=48, H=4, D=64, sinks=1, window=7, max_draft=8),
    "small": dict(T=192, H=8, D=64, sinks=1, window=15, max_draft=8),
    "nfd-310m": dict(T=336, H=16, D=64, sinks=1, window=23, max_draft=8),
}


def _presets_from_model() -> None:
    """Take the shapes from worldmodel's presets when that package is importable (one source of truth)."""
    try:
        from worldmodel.model.transformer import PRESETS as MP
    except Exception:
        return
    for name, cfg in MP.items():
        if name in PRESETS:
            PRESETS[name].update(T=cfg.tokens_per_frame, H=cfg.heads, D=cfg.head_dim, sinks=cfg.sink_frames,
                                 window=cfg.window_frames, max_draft=cfg.max_draft)


# Dense peaks (no sparsity) from the vendors' datasheets: 16-bit tensor-core TFLOP/s (bf16 = fp16), fp32
# without TF32, memory bandwidth in GB/s. Leads, not ceilings: measure the ceilings on the device (the GPU
# suite does: a large bf16 matrix product and a device-to-device copy). Sources: NVIDIA H200 datasheet (SXM
# and NVL; the sheet's 1,979 / 1,671 TFLOP/s are "with sparsity", halved here), H100 datasheet (SXM, PCIe,
# NVL; likewise halved), A100 datasheet (40GB, 80GB PCIe and SXM).
PEAKS = [  # (name pattern, label, tflops_16bit, tflops_fp32, gbps)
    (r"H200.*NVL", "H200 NVL", 835.0, 60.0, 4800.0),
    (r"H200", "H200 SXM", 989.0, 67.0, 4800.0),
    (r"H100.*PCIe", "H100 PCIe", 756.0, 51.0, 2000.0),
    (r"H100.*NVL", "H100 NVL", 835.0, 60.0, 3900.0),
    (r"H100", "H100 SXM", 989.0, 67.0, 3350.0),
    (r"A100.*80GB.*PCIe|A100.*PCIe.*80GB", "A100 PCIe 80GB", 312.0, 19.5, 1935.0),
    (r"A100.*80GB", "A100 SXM 80GB", 312.0, 19.5, 2039.0),
    (r"A100", "A100 40GB", 312.0, 19.5, 1555.0),
]
PEAKS_SOURCE = ("vendor datasheets (NVIDIA H200, H100, A100), dense: the sheets' 'with sparsity' tensor-core "
                "figures halved")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def device_peaks(name: str, dtype: torch.dtype) -> dict:
    for pattern, label, tf16, tf32, gbps in PEAKS:
        if re.search(pattern, name, re.IGNORECASE):
            return dict(label=label, tflops=tf32 if dtype == torch.float32 else tf16, gbps=gbps, source=PEAKS_SOURCE)
    return dict(label="n/a", tflops=None, gbps=None, source=f"no datasheet entry for {name!r}")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def git_dirty() -> bool | None:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "kernels", "benchmarks/bench_attention.py"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return bool(out.strip())
    except Exception:
        return None


def ring_valid(slots: int, sinks: int, valid_frames: int, t: int, device) -> torch.Tensor:
    """(1, slots*T) bool: the sinks, then ``valid_frames - sinks`` window frames wrapped around the ring."""
    fv = torch.zeros(slots, dtype=torch.bool)
    fv[:min(sinks, valid_frames)] = True
    window = slots - sinks
    head = window // 2
    for j in range(max(valid_frames - sinks, 0)):
        fv[sinks + (head + j) % window] = True
    return fv.repeat_interleave(t)[None].to(device)


def time_fn(fns: list, device: torch.device, repeats: int, warmup: int, budget_s: float) -> dict:
    """Milliseconds per call of `fns`: the same call over different input sets, run in turn so that repeated
    calls do not find their inputs in the L2 cache. The first call (compile, autotune) is timed apart.

    CUDA: `ms` from replays of one CUDA graph of a pass over the sets (device time, no launch gaps) where the
    calls can be captured, else from back-to-back eager calls (`timing` says which and why); `ms_eager` from
    back-to-back eager calls (Python and launch overhead included, as an eager engine sees it).
    CPU: each call timed with the host clock; at least 3 timed calls, then stop once over budget_s."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fns[0]()
    sync()
    res = {"first_call_ms": (time.perf_counter() - t0) * 1e3}
    for _ in range(warmup):
        for f in fns:
            f()
    if not cuda:
        times, t_begin = [], time.perf_counter()
        for i in range(repeats):
            t = time.perf_counter()
            fns[i % len(fns)]()
            times.append((time.perf_counter() - t) * 1e3)
            if i >= 2 and time.perf_counter() - t_begin > budget_s:
                break
        return dict(res, ms=statistics.median(times), ms_min=min(times), timing="host clock, each call")

    def per_call_ms(run) -> list[float]:
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / len(fns))
        return times

    eager = per_call_ms(lambda: [f() for f in fns])
    res["ms_eager"] = statistics.median(eager)
    try:
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # a warm-up on a side stream, as capture wants
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            for f in fns:
                f()
        times = per_call_ms(graph.replay)
        return dict(res, ms=statistics.median(times), ms_min=min(times),
                    timing=f"CUDA graph replay, {len(fns)} input set(s) in turn")
    except Exception as e:  # not capturable: say so and keep the eager times
        torch.cuda.synchronize()
        why = str(e).splitlines()[0][:160] if str(e) else ""
        return dict(res, ms=statistics.median(eager), ms_min=min(eager),
                    timing=f"eager back-to-back, {len(fns)} input set(s) (no CUDA graph: {type(e).__name__}: {why})")


def input_sets(device: torch.device, nbytes: float) -> int:
    """How many input sets to rotate through so that together they are twice the L2 cache (at most 8)."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 2**20
    return max(1, min(8, math.ceil(2 * l2 / max(nbytes, 1))))


def sdpa_kernels(fn) -> list[str]:
    """The aten kernels that scaled_dot_product_attention dispatched to in one call of fn (flash, efficient,
    cudnn or math), read from the profiler's record of the call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({e.name for e in prof.events() if "scaled_dot_product" in e.name
                   and e.name != "aten::scaled_dot_product_attention"})


def cases(args, device):
    """In order of interest, so that a run cut short by a time limit has the headline rows: each preset's
    inference against a full cache (the steady state of a rollout), then training, then inference while the
    cache fills (1 valid frame; on CUDA also half)."""
    later = []
    for preset in args.presets:
        p = PRESETS[preset]
        slots = p["sinks"] + p["window"]
        if "cached" in args.kinds:
            lens = sorted({1, max(1, slots // 2)} - {slots}) if device.type == "cuda" else [1]
            for f in args.frames:
                yield dict(preset=preset, kind="cached", F=f, valid_frames=slots, cache_slots=slots, **p)
                later += [dict(preset=preset, kind="cached", F=f, valid_frames=c, cache_slots=slots, **p) for c in lens]
    for preset in args.presets:
        p = PRESETS[preset]
        clip = p["sinks"] + p["window"] + p["max_draft"]
        for kind in ("train_fwd", "train_fwd_bwd"):
            if kind in args.kinds:
                yield dict(preset=preset, kind=kind, F=clip, valid_frames=None, cache_slots=None, **p)
    yield from later


def flops_bytes(case, batch, es):
    t, h, d, f = case["T"], case["H"], case["D"], case["F"]
    pairs_new = t * t * f * (f + 1) // 2
    qkv = batch * h * f * t * d * es
    if case["kind"] == "cached":
        s = case["cache_slots"] * t
        pairs = pairs_new + f * t * case["valid_frames"] * t
        return 4 * d * pairs * batch * h, 4 * qkv + 2 * batch * h * s * d * es + batch * s
    fwd = 4 * d * pairs_new * batch * h
    if case["kind"] == "train_fwd":
        return fwd, 4 * qkv
    return 3.5 * fwd, 12 * qkv


def skip_reason(case, backend, device, args) -> str | None:
    if backend not in kernels.BACKENDS:
        return "unknown backend"
    try:
        kernels.check_backend(backend, device)
    except RuntimeError as e:
        return str(e)
    if device.type == "cpu":
        if backend == "triton" and case["preset"] != "tiny":
            return "triton interpreter on CPU: tiny shape only"
        if backend == "flex" and case["kind"] == "train_fwd_bwd":
            return "FlexAttention has no backward on CPU"
        if backend == "flex" and case["preset"] != "tiny" and not args.flex_all and \
                os.environ.get("KERNELS_FLEX_COMPILE", "1") != "0":
            return "compiled flex on CPU: tiny shape only (seconds of compile per shape; --flex-all)"
        if case["preset"] == "nfd-310m" and case["kind"] != "cached" and not args.cpu_full:
            return "nfd-310m training shape on CPU skipped (--cpu-full)"
        if backend == "triton" and (case["kind"] != "cached" or case["F"] > 4):
            return "triton interpreter on CPU: tiny cached F<=4 only"
    return None


def make_fn(case, backend, device, dtype, batch: int, seed: int):
    """A call of `backend` at `case` on fresh random inputs (seed), returning its output."""
    b, t, h, d, f = batch, case["T"], case["H"], case["D"], case["F"]
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda n: torch.randn(b, h, n, d, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    q, k, v = mk(f * t), mk(f * t), mk(f * t)
    if case["kind"] == "cached":
        kc, vc = mk(case["cache_slots"] * t), mk(case["cache_slots"] * t)
        valid = ring_valid(case["cache_slots"], case["sinks"], case["valid_frames"], t, device).expand(b, -1)
        valid = valid.contiguous()

        def fn():
            with torch.no_grad():
                return kernels.cached_attention(q, k, v, kc, vc, valid, t, backend=backend)
    elif case["kind"] == "train_fwd":
        def fn():
            with torch.no_grad():
                return kernels.block_causal_attention(q, k, v, t, backend=backend)
    else:
        qg, kg, vg = [x.clone().requires_grad_() for x in (q, k, v)]
        dout = torch.randn(qg.shape, generator=g).to(device=device, dtype=dtype)

        def fn():
            out = kernels.block_causal_attention(qg, kg, vg, t, backend=backend)
            out.backward(dout)
            return out.detach()
    return fn


def run_case(case, backend, device, dtype, args, nbytes: float):
    """(timing dict, output of one call, the call) of `backend` at `case`."""
    fns = [make_fn(case, backend, device, dtype, args.batch, seed) for seed in range(input_sets(device, nbytes))]
    res = time_fn(fns, device, repeats=args.repeats, warmup=args.warmup,
                  budget_s=args.budget_s if device.type == "cpu" else 1e9)
    return res, fns[0](), fns[0]


def main(argv=None, meta: dict | None = None):
    """Run the benchmark (argv: its command line); `meta` is merged into the JSON (the GPU suite's provenance).
    The JSON is rewritten after every case, so a run stopped part way keeps what it measured."""
    _presets_from_model()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                    help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument("--backends", nargs="+", default=["triton", "sdpa", "matmul", "flex"])
    ap.add_argument("--kinds", nargs="+", default=["cached", "train_fwd", "train_fwd_bwd"],
                    choices=["cached", "train_fwd", "train_fwd_bwd"])
    ap.add_argument("--frames", nargs="+", type=int, default=[1, 4, 8], help="new frames F (inference)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None, help="default: 30 on CUDA, 15 on CPU")
    ap.add_argument("--warmup", type=int, default=None, help="default: 5 on CUDA, 1 on CPU")
    ap.add_argument("--budget-s", type=float, default=0.5,
                    help="CPU: stop repeating a case after this long (at least 3 timed calls)")
    ap.add_argument("--flex-all", action="store_true", help="CPU: compiled flex at every shape")
    ap.add_argument("--cpu-full", action="store_true", help="CPU: include the nfd-310m training shape")
    ap.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads (default: torch's)")
    ap.add_argument("--time-limit-s", type=float, default=None,
                    help="start no new case after this many seconds (the rest are recorded as skipped)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/attention_<device>.json)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":  # the allocator as the engine sets it (no page faults on every call's scores)
        from worldmodel.device import keep_freed_memory
        keep_freed_memory()
    # compiled flex recompiles per shape: keep dynamo from giving up (and silently running eager) mid-run
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
    cuda = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if cuda else "fp32")]
    args.repeats = args.repeats or (30 if cuda else 15)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    name = device_name(device)
    peaks = device_peaks(name, dtype)
    es = torch.finfo(dtype).bits // 8
    notes = []
    if not cuda:
        if os.environ.get("TRITON_INTERPRET") != "1":
            notes.append("triton skipped: no CUDA (set TRITON_INTERPRET=1 for the interpreter, tiny shapes only)")
        else:
            notes.append("triton ran in the Triton interpreter: its timings say nothing about the kernels")
        notes.append(f"flex on CPU: {'compiled' if os.environ.get('KERNELS_FLEX_COMPILE', '1') != '0' else 'eager'}"
                     "; no backward on CPU")
    load = _loadavg()
    if not cuda and load and load[0] > (os.cpu_count() or 1) * 0.75:
        notes.append(f"machine busy (load average {load[0]} on {os.cpu_count()} cores): CPU timings are noisy; "
                     "--threads 1 is steadier under contention")
    print(f"device: {name} | dtype {str(dtype).replace('torch.', '')} | ceilings: "
          f"{peaks['tflops'] if peaks['tflops'] else 'n/a'} TFLOP/s, {peaks['gbps'] if peaks['gbps'] else 'n/a'} GB/s"
          f" ({peaks['label']})")
    for n in notes:
        print("note:", n)
    header = (f"{'preset':9} {'kind':13} {'F':>3} {'cache':>6} {'backend':7} {'ms(med)':>9} {'ms(min)':>9} {'TFLOP/s':>8} "
              f"{'%peak':>6} {'GB/s':>8} {'%peak':>6} {'maxdiff':>8}")
    print(header)
    print("-" * len(header))
    results = []
    t_start = time.time()
    out = Path(args.out) if args.out else ROOT / "benchmarks" / (
        "attention_cpu.json" if not cuda else f"attention_{re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = dict(
        benchmark="attention", status="running", device=name, device_type=device.type,
        dtype=str(dtype).replace("torch.", ""), ceilings=peaks, torch=torch.__version__, triton=_triton_version(),
        python=platform.python_version(), git_commit=git_commit(), git_dirty_kernels=git_dirty(),
        command=" ".join([Path(sys.executable).name] + [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
        if argv is None else "bench_attention.main(" + repr(argv) + ")",
        env={k: os.environ[k] for k in ("TRITON_INTERPRET", "KERNELS_FLEX_COMPILE") if k in os.environ},
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        threads=torch.get_num_threads(), repeats=args.repeats, warmup=args.warmup,
        timing_note="ms = median (ms_min = fastest) of the timed calls, throughput from the median; on CUDA from "
                    "CUDA graph replays where the calls can be captured ('timing' says), with input sets rotated "
                    "so that they are not served from L2; ms_eager: back-to-back eager calls, launch overhead "
                    "included; first_call_ms: the first call (compile, autotune)",
        flops_note="4*D per visible query-key pair (invalid cache slots and masked pairs not counted); "
                   "fwd+bwd = 3.5x fwd",
        bytes_note="q,k,v,out (+do,dq,dk,dv) + whole static cache buffer k,v + validity",
        load_average_start_end=[_loadavg(), None], notes=notes, time_limit_s=args.time_limit_s, results=results)
    report.update(meta or {})

    def save():
        report["wall_s"] = round(time.time() - t_start, 1)
        atomic_write_json(out, report)

    save()
    for case in cases(args, device):
        ref_out = None
        flops, nbytes = flops_bytes(case, args.batch, es)
        order = ["sdpa"] + [b for b in args.backends if b != "sdpa"]  # sdpa first: the others diff against it
        out_of_time = args.time_limit_s is not None and time.time() - t_start > args.time_limit_s
        for backend in order:
            ref_only = backend not in args.backends  # sdpa run only to diff the others against
            row = dict(preset=case["preset"], kind=case["kind"], F=case["F"], T=case["T"], H=case["H"],
                       D=case["D"], batch=args.batch, cache_slots=case["cache_slots"],
                       cache_valid_frames=case["valid_frames"], backend=backend, flops=flops, bytes=nbytes)
            reason = (f"time limit ({args.time_limit_s:g} s) reached" if out_of_time else
                      skip_reason(case, backend, device, args))
            if reason:
                if not ref_only:
                    results.append(dict(row, skipped=reason))
                continue
            try:
                timing, out_t, fn = run_case(case, backend, device, dtype, args, nbytes)
                if backend == "sdpa" and not ref_only:
                    row["sdpa_kernels"] = sdpa_kernels(fn)
            except Exception as e:  # a failing backend is reported, not hidden
                results.append(dict(row, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
                print(f"{case['preset']:9} {case['kind']:13} {case['F']:>3} {str(case['valid_frames'] or '-'):>6} "
                      f"{backend:7} ERROR {type(e).__name__}: {e}"[:200])
                continue
            if backend == "sdpa":
                ref_out = out_t.float()
            diff = None if ref_out is None or backend == "sdpa" else (out_t.float() - ref_out).abs().max().item()
            if ref_only:
                continue
            ms = timing["ms"]
            tflops = flops / ms / 1e9
            gbps = nbytes / ms / 1e6
            pt = f"{100 * tflops / peaks['tflops']:.1f}" if peaks["tflops"] else "n/a"
            pg = f"{100 * gbps / peaks['gbps']:.1f}" if peaks["gbps"] else "n/a"
            results.append(dict(row, **timing, tflops=tflops, gbps=gbps, max_abs_diff_vs_sdpa=diff))
            cache = "-" if case["valid_frames"] is None else f"{case['valid_frames']}/{case['cache_slots']}"
            print(f"{case['preset']:9} {case['kind']:13} {case['F']:>3} {cache:>6} {backend:7} {ms:9.3f} "
                  f"{timing['ms_min']:9.3f} {tflops:8.4f} {pt:>6} {gbps:8.2f} {pg:>6} "
                  f"{'-' if diff is None else f'{diff:.1e}':>8}", flush=True)
        save()
    skipped = sorted({(r["backend"], r["skipped"]) for r in results if "skipped" in r})
    for backend, why in skipped:
        print(f"skipped {backend}: {why}")
    report["load_average_start_end"][1] = _loadavg()
    report["status"] = "ok"
    save()
    print(f"wrote {out} ({report['wall_s']} s)")
    return report


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _triton_version():
    try:
        import triton
        return triton.__version__
    except Exception:
        return None


if __name__ == "__main__":
    main()
