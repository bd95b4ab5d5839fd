"""The measurement of `worldmodel bench` (method in worldmodel/evaluation/bench.py): one engine setting
applied, frames timed from a one-frame context the way the engine runs them, several rounds pooled, and a
per-stage profile of a frame. Also used by benchmarks/bench_speed.py and benchmarks/gpu_suite.py."""
from __future__ import annotations

import math
import time

import numpy as np

from worldmodel.inference.settings import SWEPT
from worldmodel.game.action import Action
from worldmodel.device import memory_mb, reset_peak_memory, synchronize


# --------------------------------------------------------------------------------------------------
# timers
# --------------------------------------------------------------------------------------------------
def percentiles(values_ms) -> dict:
    v = np.asarray(values_ms, dtype=np.float64)
    if v.size == 0:
        return {}
    return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)),
            "p99": float(np.percentile(v, 99)), "min": float(v.min()), "max": float(v.max())}


def rollout_bins(latencies_ms, cache_frames: int) -> list[dict]:
    """Latency by rollout length: frames 1, 2-3, 4-7, ... (and the frame where the cache is full)."""
    n = len(latencies_ms)
    edges = sorted({1, *[2 ** k for k in range(1, int(math.log2(max(n, 1))) + 2)], cache_frames + 1, n + 1})
    edges = [e for e in edges if e <= n + 1]
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        seg = latencies_ms[a - 1:b - 1]
        if len(seg):
            out.append({"frames": [a, b - 1], "p50_ms": float(np.median(seg)), "mean_ms": float(np.mean(seg)),
                        "fps": float(1000.0 * len(seg) / np.sum(seg))})
    return out


# --------------------------------------------------------------------------------------------------
# one measurement
# --------------------------------------------------------------------------------------------------
def apply_settings(wm, settings: dict) -> None:
    wm.configure(**{k: settings[k] for k in SWEPT if k in settings})


def current_settings(wm) -> dict:
    return {k: getattr(wm, k) for k in SWEPT}


def extra_settings(wm) -> dict:
    """Engine settings that are not swept but shape the numbers (recorded in the JSON)."""
    return {"speculative_tolerance": wm.speculative_tolerance, "dtype": str(wm.dtype)}


def context_frames(wm, n: int = 1) -> tuple[np.ndarray, list[Action]]:
    """A start scene for speed tests: the checkpoint's first start clip if it ships one, else noise (the
    content does not change the cost)."""
    clips = wm.start_clips()
    if clips:
        f, a = clips[0]
        return f[-n:], a[-n:]
    H, W = wm.frame_size
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8), [Action()] * n


def measure(wm, trace: list[Action], frames: int, warmup: int, progress=None) -> dict:
    """Warm up, then time `frames` frames from a one-frame context, the way the engine runs them: with
    `wm.pipeline` each frame is decoded on a second thread while the next is generated (latency = from
    the action to its decoded frame; frames/s = frames / the time until the last one is decoded),
    otherwise one `WorldModel.step` after another. Returns the raw result."""
    from worldmodel.inference.pipeline import FramePipeline

    dev = wm.device
    ctx_f, ctx_a = context_frames(wm, 1)
    act = lambda i: trace[i % len(trace)]  # noqa: E731
    done = np.zeros(frames)
    cpu = np.zeros((frames, 2))  # thread CPU seconds of the two stages

    def on_frame(frame, i, times):
        if isinstance(frame, BaseException):
            raise frame
        done[i] = times["t_done"]
        cpu[i] = times["advance_cpu"], times["render_cpu"]
        if progress is not None:
            progress.update(1)

    synchronize(dev)
    t0 = time.perf_counter()
    if warmup:
        wm.reset(ctx_f, ctx_a)
        for i in range(warmup):
            wm.step(act(i))
        synchronize(dev)
    warmup_s = time.perf_counter() - t0
    reset_peak_memory(dev)
    synchronize(dev)
    t = time.perf_counter()
    wm.reset(ctx_f, ctx_a)
    synchronize(dev)
    reset_ms = (time.perf_counter() - t) * 1000
    wm.reset_stats()
    start = np.empty(frames)
    t_start = time.perf_counter()
    with FramePipeline(wm.step_latent, wm.decode, on_frame, threaded=wm.pipeline) as pipe:
        for i in range(frames):
            start[i] = time.perf_counter()
            pipe.submit(act(i), tag=i)
            synchronize(dev)
        pipe.flush()
    total_s = done.max() - t_start
    lat = (done - start) * 1000
    stats = wm.stats
    res = {"status": "ok", "frames": frames, "warmup_frames": warmup, "warmup_s": warmup_s, "reset_ms": reset_ms,
           "total_s": total_s, "fps": frames / total_s, "latency_ms": percentiles(lat),
           "peak_memory_mb": memory_mb(dev, peak=True),
           "acceptance_rate": stats["acceptance_rate"], "engine_stats": stats,
           "latency_ms_per_frame": [round(float(x), 3) for x in lat]}
    if frames > wm.cfg.cache_frames + 1:
        if wm.pipeline:  # the steady state: frames/s from the frame where the cache is full to the last
            k = wm.cfg.cache_frames
            res["fps_cache_full"] = float((frames - 1 - k) / (done[-1] - done[k]))
        else:
            full = lat[wm.cfg.cache_frames:]
            res["fps_cache_full"] = float(1000.0 * len(full) / full.sum())
    if dev.type == "cpu" and wm.threads == 1:
        # what the stages cost on cores of their own (thread CPU time; far less sensitive than the wall
        # clock to other processes on a shared machine): frames/s an idle machine would give
        busiest = max(cpu[:, 0].sum(), cpu[:, 1].sum()) if wm.pipeline else cpu.sum()
        res["fps_cpu_time"] = float(frames / busiest)
        res["cpu_ms_per_frame"] = {"generate": float(cpu[:, 0].mean() * 1000), "decode": float(cpu[:, 1].mean() * 1000)}
    return res


def profile_frames(wm, trace: list[Action], frames: int = 60, warmup: int = 10) -> dict:
    """Where a frame's time goes, frame after frame in one thread (the stages add up): wall ms per
    frame (median, mean, p90) of
      pass_1: the first transformer pass (it also commits the previous frame: fused commit);
      passes_2_on: the other denoising passes, together;
      commit: the fused commit's share of pass 1 (pass 1 minus the median later pass; 2+ steps only);
      sampler_other: the rest of step_latent (noise, drafts, bookkeeping);
      decode: the decoder's convolutions;
      colour_conversion: the rest of decode (latent de-normalisation, float -> uint8 RGB, to the host).
    Display (scaling, HUD, flip) happens in `worldmodel play` and is in its report ("profile_ms")."""
    ctx_f, ctx_a = context_frames(wm, 1)
    passes: list[list[float]] = [[]]
    conv = []
    orig_forward = wm.sampler.forward

    def timed_forward(*a, **k):
        t = time.perf_counter()
        out = orig_forward(*a, **k)
        passes[-1].append(time.perf_counter() - t)
        return out

    def conv_start(module, args):
        conv.append(time.perf_counter())

    def conv_end(module, args, out):
        conv[-1] = time.perf_counter() - conv[-1]

    hooks = [wm._decoder.register_forward_pre_hook(conv_start), wm._decoder.register_forward_hook(conv_end)]
    wm.sampler.forward = timed_forward
    rows = []
    try:
        wm.reset(ctx_f, ctx_a)
        for i in range(warmup + frames):
            passes.append([])
            del conv[:]
            t0 = time.perf_counter()
            latent = wm.step_latent(trace[i % len(trace)])
            t1 = time.perf_counter()
            wm.decode(latent)
            t2 = time.perf_counter()
            if i >= warmup and passes[-1]:  # frames served from a draft run no pass: not in the table
                p = passes[-1]
                rows.append({"pass_1": p[0], "passes_2_on": sum(p[1:]), "later_pass": p[1] if len(p) > 1 else None,
                             "sampler_other": (t1 - t0) - sum(p), "decode": conv[0],
                             "colour_conversion": (t2 - t1) - conv[0], "step": t2 - t0})
    finally:
        wm.sampler.forward = orig_forward
        for h in hooks:
            h.remove()
    out = {"frames": len(rows), "threads": wm.threads, "unit": "ms per frame, wall, one thread of work", "stages": {}}
    later = [r["later_pass"] for r in rows if r["later_pass"] is not None]
    for key in ("pass_1", "passes_2_on", "commit", "sampler_other", "decode", "colour_conversion", "step"):
        if key == "commit":
            if not later:
                continue
            v = np.asarray([r["pass_1"] for r in rows]) - float(np.median(later))
        else:
            v = np.asarray([r[key] for r in rows])
        v = v * 1000.0
        out["stages"][key] = {"p50": round(float(np.median(v)), 3), "mean": round(float(v.mean()), 3),
                              "p90": round(float(np.percentile(v, 90)), 3)}
    return out


def combine_rounds(runs: list[dict]) -> dict:
    """One result from several rounds of the same measurement: frames/s over all frames, latency
    percentiles over all frames, the per-frame curve as the median over rounds at each rollout length,
    warm-up of the first round (it holds any compile time)."""
    if len(runs) == 1:
        return {**runs[0], "rounds": 1, "fps_rounds": [runs[0]["fps"]]}
    lat = np.asarray([r["latency_ms_per_frame"] for r in runs])  # (rounds, frames)
    frames = sum(r["frames"] for r in runs)
    total = sum(r["total_s"] for r in runs)
    out = {**runs[0], "rounds": len(runs), "frames": frames, "total_s": total, "fps": frames / total,
           "fps_rounds": [r["fps"] for r in runs], "warmup_s": runs[0]["warmup_s"],
           "warmup_s_rounds": [r["warmup_s"] for r in runs], "reset_ms": float(np.median([r["reset_ms"] for r in runs])),
           "latency_ms": percentiles(lat.ravel()),
           "peak_memory_mb": max((r["peak_memory_mb"] or 0) for r in runs) or None,
           "latency_ms_per_frame": [round(float(x), 3) for x in np.median(lat, axis=0)]}
    stats = [r["engine_stats"] for r in runs]
    summed = {k: sum(s[k] for s in stats) for k, v in stats[0].items()
              if isinstance(v, (int, float)) and "rate" not in k}
    out["engine_stats"] = summed
    resolved = summed["accepted"] + summed["discarded"]
    out["acceptance_rate"] = summed["accepted"] / resolved if resolved else None
    for k in ("fps_cache_full", "fps_cpu_time"):
        if k in runs[0]:
            out[k] = float(np.mean([r[k] for r in runs]))
    return out
