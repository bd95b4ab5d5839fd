"""`worldmodel bench`: the engine's speed, for a checkpoint or for a preset with random weights.

    worldmodel bench --preset tiny --frames 300 --steps 1,2,4 --speculative 1,2,4 --attention sdpa,torch \
        --compile on,off --out benchmarks/bench_tiny_cpu.json

What is measured, for the baseline (the model's own settings: its sampling steps, speculative 1,
default attention backend, compile off) and for each variant, one setting changed at a time:
- warm-up (first `--warmup` frames after a reset, compile time included) timed apart and excluded;
- then a fresh reset with ONE context frame, so the timed frames show the KV cache filling up
  (frames 1 .. sink+window) and then staying full; per-frame latency of `WorldModel.step` with
  synchronised timers (CUDA synchronised around each step), frames/s = frames / total time,
  p50/p90/p99/max latency, latency by rollout length (log-spaced bins);
- speculative N: acceptance rate from the engine's `stats` under a human-like action trace
  (benchmarks/traces/*.jsonl: the explorer policy playing the real game; `--trace game` records one now);
- peak memory: CUDA max allocated, or the process's peak RSS (VmHWM, reset before each variant) on CPU;
- on CPU with one intra-op thread, "cpu fps": frames/s from the stages' thread CPU time (what each costs
  on a core of its own; far steadier than the wall clock on a shared machine);
- a per-frame profile of the baseline: where a frame's time goes, stage by stage (profile_frames).
The engine's frame pipeline (`pipeline`: frame t decoded on a second thread while t+1 is generated) is
measured the way it runs: frames/s = frames / the time until the last frame is decoded.
Variants are compared as ratios to the baseline measured in the same run.

Output: a table on screen, the JSON (device, commit, command, torch version, threads, every result) and a
PNG beside it (latency vs rollout length; frames/s per variant).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from worldmodel.game.action import Action, ActionScript, save_actions
from worldmodel.device import (device_info, device_tag, memory_kind, memory_mb, reset_peak_memory,
                               synchronize)
from worldmodel.files import check_output_path
from worldmodel.inference.loading import add_model_arguments, load_model, model_name
from worldmodel.inference.settings import SWEPT, add_engine_arguments, sweep_from_args
from worldmodel.provenance import provenance
from worldmodel.errors import UserError

SCHEMA_VERSION = 1
TRACE_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "traces"
DEFAULT_TRACE = "explorer_MAP01_seed0.jsonl"


# --------------------------------------------------------------------------------------------------
# device, memory, timers
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
# the action trace
# --------------------------------------------------------------------------------------------------
def game_trace(n: int, map_name: str = "MAP01", seed: int = 0, wad: str = "freedoom2") -> list[Action]:
    """n actions of the explorer policy playing the real game (it sees depth and position): human-like."""
    from worldmodel.game.doom import DoomEnv
    from worldmodel.game.policy import ExplorerPolicy

    policy = ExplorerPolicy(seed)
    out = []
    with DoomEnv(wad=wad, map=map_name, seed=seed, depth=True) as env:
        env.reset()
        for _ in range(n):
            a = policy.act(env.position, env.depth)
            env.step(a)
            out.append(a)
    return out


def load_trace(spec: str | None, n: int, seed: int = 0) -> tuple[list[Action], str]:
    """(actions, description). spec: a JSON Lines file, 'game' (record now), 'blind' (explorer without
    eyes), or None (the shipped trace, else 'game')."""
    if spec is None:
        shipped = TRACE_DIR / DEFAULT_TRACE
        if shipped.exists():
            spec = str(shipped)
        else:
            spec = "game"
    if spec == "game":
        return game_trace(n, seed=seed), f"explorer policy playing freedoom2 MAP01, seed {seed} (recorded now)"
    if spec == "blind":
        from worldmodel.game.policy import explorer_actions

        return explorer_actions(n, seed), f"explorer policy without eyes, seed {seed}"
    actions = list(itertools.islice(ActionScript(spec), n))  # a script longer than the run is read no further
    try:
        shown = str(Path(spec).resolve().relative_to(Path.cwd()))
    except ValueError:
        shown = str(spec)
    return actions, shown


def trace_summary(actions: list[Action], tolerance: float | None = None) -> dict:
    """How repetitive a trace is: exact repeats, runs, turning; with `tolerance` (the engine's
    speculative_tolerance, degrees) the fraction of next actions a draft could stand for (an upper bound
    on the speculative acceptance rate)."""
    pairs = list(zip(actions, actions[1:]))
    same = sum(1 for a, b in pairs if a == b)
    runs = 1 + sum(1 for a, b in pairs if a != b) if actions else 0
    out = {"frames": len(actions), "repeat_fraction": same / max(1, len(pairs)),
           "mean_run_length": len(actions) / max(1, runs),
           "turning_fraction": sum(1 for a in actions if a.turn != 0) / max(1, len(actions))}
    if tolerance is not None:
        from worldmodel.inference.engine import speculative_match

        out["speculative_tolerance"] = tolerance
        out["draftable_fraction"] = sum(1 for a, b in pairs if speculative_match(a, b, tolerance)) / max(1, len(pairs))
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


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--frames", type=int, default=300, help="timed frames per measurement (default 300)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed warm-up frames before each (default 20)")
    parser.add_argument("--out", metavar="FILE.json",
                        help="where to write the JSON (default benchmarks/bench_<model>_<device>.json); the PNG "
                             "goes beside it")
    add_engine_arguments(parser, SWEPT, lists=SWEPT)  # each value given is measured against the engine's defaults
    parser.add_argument("--trace", metavar="FILE|game|blind",
                        help=f"action trace (default benchmarks/traces/{DEFAULT_TRACE}, else 'game': the explorer "
                             f"policy playing MAP01 now)")
    parser.add_argument("--save-trace", metavar="FILE", help="also write the trace used (JSON Lines)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure everything this many times, in rotating order, and pool (default 1; more "
                             "evens out a busy machine)")
    parser.add_argument("--profile-frames", type=int, default=60,
                        help="frames of the per-stage profile of the baseline (default 60; 0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the 'game' trace (default 0)")
    parser.add_argument("--no-plot", action="store_true", help="no PNG")
    parser.add_argument("--no-progress", action="store_true")


def _variants(args, base: dict) -> list[tuple[str, object]]:
    out = sweep_from_args(args)
    seen, uniq = set(), []
    for k, v in out:
        if (k, v) not in seen and base.get(k) != v:
            seen.add((k, v))
            uniq.append((k, v))
    return uniq


def _fmt(v, spec=".1f", none="-"):
    return none if v is None else format(v, spec)


def print_table(result: dict, file=None) -> None:
    file = file or sys.stdout
    rows = [("baseline", result["baseline"])] + [(f"{v['factor']}={v['value']}", v) for v in result["variants"]]
    head = f"{'variant':<18}{'fps':>8}{'x base':>8}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'warmup s':>10}" \
           f"{'peak MB':>9}{'accept':>8}{'cpu fps':>9}"
    print(head, file=file)
    print("-" * len(head), file=file)
    for name, r in rows:
        if r.get("status") != "ok":
            print(f"{name:<18}  {r.get('status')}", file=file)
            continue
        lat = r["latency_ms"]
        acc = r.get("acceptance_rate")
        print(f"{name:<18}{r['fps']:>8.1f}{_fmt(r.get('speedup', 1.0), '.2f'):>8}{lat['p50']:>9.1f}{lat['p90']:>9.1f}"
              f"{lat['p99']:>9.1f}{r['warmup_s']:>10.1f}{_fmt(r.get('peak_memory_mb'), '.0f'):>9}"
              f"{_fmt(acc, '.2f'):>8}{_fmt(r.get('fps_cpu_time')):>9}", file=file)


def print_profile(profile: dict, file=None) -> None:
    file = file or sys.stdout
    print(f"\nwhere a frame's time goes (baseline settings, frame after frame, {profile['threads']} thread(s); "
          f"ms, p50 / mean):", file=file)
    for k, v in profile["stages"].items():
        print(f"  {k:<20}{v['p50']:>8.2f}{v['mean']:>8.2f}", file=file)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [("baseline", result["baseline"])] + [(f"{v['factor']}={v['value']}", v) for v in result["variants"]
                                                  if v.get("status") == "ok"]
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(10, 9), gridspec_kw={"height_ratios": [3, 2]})
    cache = result["model"]["cache_frames"]
    for i, (name, r) in enumerate(runs):
        lat = np.asarray(r["latency_ms_per_frame"])
        x = np.arange(1, len(lat) + 1)
        if i == 0:
            ax.plot(x, lat, ".", ms=3, alpha=0.35, color="C0", label="baseline, each frame")
        # a running mean: it is the throughput that matters, and speculative sampling's latencies are
        # bimodal (an accepted draft costs a decode, a miss a whole batched pass), which a median hides
        k = max(1, min(15, len(lat) // 20))
        c = np.concatenate([[0.0], np.cumsum(lat)])
        lo, hi = np.maximum(0, np.arange(len(lat)) - k), np.minimum(len(lat), np.arange(len(lat)) + k + 1)
        smooth = (c[hi] - c[lo]) / (hi - lo)
        ax.plot(x, smooth, "-", lw=2 if i == 0 else 1.2, color=f"C{i % 10}", label=f"{name} (running mean)")
    ax.axvline(cache, ls="--", color="grey")
    ax.text(cache, ax.get_ylim()[1], f" KV cache full ({cache} frames)", va="top", color="grey", fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel("rollout length (frames since reset with one context frame)")
    ax.set_ylabel("latency per frame (ms)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=3, loc="upper right", framealpha=0.85)
    ax.set_ylim(top=ax.get_ylim()[1] * 1.25)  # room for the legend
    dev = result["device"]
    ax.set_title(f"worldmodel bench: {result['model']['name']} on {dev['name']} ({dev['type']}, torch threads "
                 f"{dev['threads']}), commit {str(result.get('commit') or '?')[:10]}", fontsize=10)
    names = [n for n, _ in runs]
    fps = [r["fps"] for _, r in runs]
    bars = bx.bar(range(len(runs)), fps, color=[f"C{i % 10}" for i in range(len(runs))])
    for b, (_, r) in zip(bars, runs):
        label = f"{r['fps']:.1f}\nx{r.get('speedup', 1.0):.2f}"
        if r.get("acceptance_rate") is not None:
            label += f"\nacc {r['acceptance_rate']:.2f}"
        bx.text(b.get_x() + b.get_width() / 2, b.get_height(), label, ha="center", va="bottom", fontsize=8)
    bx.set_xticks(range(len(runs)), names, rotation=20, fontsize=8)
    bx.set_ylabel("frames / s")
    bx.set_ylim(0, max(fps) * 1.35)
    bx.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _Unavailable(Exception):
    pass


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _first_line(e: BaseException, limit: int = 160) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    if len(lines) > 1 and text.endswith(":"):
        text += " " + lines[1]
    return text[:limit]


def run(args) -> int:
    import torch
    from worldmodel.progress import progress_bar

    if args.frames < 2:
        raise UserError(f"--frames must be at least 2, got {args.frames}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    if args.rounds < 1:
        raise UserError(f"--rounds must be at least 1, got {args.rounds}")
    if args.profile_frames < 0:
        raise UserError(f"--profile-frames must be >= 0, got {args.profile_frames}")
    if args.out and Path(args.out).suffix != ".json":
        raise UserError(f"--out must name a .json file, got {args.out}")

    def check_outputs(out: Path | None) -> None:  # before the work: nothing measured is lost at the end
        for path, what in ((out, "--out"), (out and not args.no_plot and out.with_suffix(".png"), "--out (its PNG)"),
                           (args.save_trace, "--save-trace")):
            if path:
                check_output_path(path, what)

    check_outputs(args.out and Path(args.out))
    wm = load_model(args)
    base = current_settings(wm)
    variants = _variants(args, base)
    dev = device_info(wm.device)
    name = model_name(args, wm)
    out = Path(args.out or f"benchmarks/bench_{name}_{device_tag(dev)}.json")
    png = out.with_suffix(".png")
    if not args.out:  # the default path, named after the model and the device
        check_outputs(out)
    need = args.warmup + args.frames
    trace, trace_src = load_trace(args.trace, max(need, 1000), seed=args.seed)
    if args.save_trace:
        Path(args.save_trace).parent.mkdir(parents=True, exist_ok=True)
        save_actions(args.save_trace, trace)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = wm.cfg
    n_params = sum(p.numel() for p in wm.transformer.parameters())
    n_ae = sum(p.numel() for p in wm.autoencoder.parameters())
    result = {
        "schema": SCHEMA_VERSION, "tool": "worldmodel bench", **provenance(), "platform": platform.platform(),
        "device": dev,
        "model": {"name": name, "preset": args.preset, "checkpoint": None if args.preset else str(wm.folder),
                  "random_weights": bool(args.preset), "frame_size": list(cfg.frame_size),
                  "fps_target": wm.fps, "tokens_per_frame": cfg.tokens_per_frame, "dim": cfg.dim,
                  "depth": cfg.depth, "heads": cfg.heads, "sink_frames": cfg.sink_frames,
                  "window_frames": cfg.window_frames, "cache_frames": cfg.cache_frames,
                  "transformer_params": n_params, "autoencoder_params": n_ae},
        "trace": {"source": trace_src, **trace_summary(trace[:need], wm.speculative_tolerance)},
        "frames": args.frames, "warmup_frames": args.warmup, "rounds": args.rounds, "memory": memory_kind(wm.device),
        "baseline_settings": base, "engine_settings": extra_settings(wm),
        "loadavg_before": _loadavg(),
    }
    rows = [("baseline", None, base)] + [(f, v, dict(base, **{f: v})) for f, v in variants]
    runs: list[list[dict]] = [[] for _ in rows]
    status: dict[int, str] = {}
    bar = progress_bar(total=args.frames * len(rows) * args.rounds, unit="frame", desc="bench",
                       disable=args.no_progress)
    with bar:
        for rnd in range(args.rounds):
            # rounds rotate the order, so that a change in machine load spreads over every variant
            k = rnd % len(rows)
            for i in list(range(k, len(rows))) + list(range(k)):
                factor, value, settings = rows[i]
                if i in status:
                    bar.update(args.frames)
                    continue
                bar.set_postfix_str(factor if value is None else f"{factor}={value}", refresh=False)
                try:
                    try:
                        apply_settings(wm, settings)
                    except Exception as e:  # a setting this engine or device does not offer
                        raise _Unavailable(_first_line(e)) from None
                    runs[i].append(measure(wm, trace, args.frames, args.warmup, bar))
                except _Unavailable as e:
                    status[i] = f"unavailable: {e}"
                    bar.update(args.frames)
                except Exception as e:  # offered, but it broke while running (e.g. torch.compile): say so
                    if i == 0:
                        raise
                    status[i] = f"failed: {type(e).__name__}: {_first_line(e)}"
                    bar.update(args.frames)
                finally:
                    try:
                        apply_settings(wm, base)
                    except Exception:
                        pass
    baseline = combine_rounds(runs[0])
    baseline.update(settings=base, speedup=1.0, p50_ratio=1.0,
                    by_rollout_length=rollout_bins(baseline["latency_ms_per_frame"], cfg.cache_frames))
    result["baseline"] = baseline
    result["variants"] = []
    for i, (factor, value, settings) in enumerate(rows[1:], 1):
        v = {"factor": factor, "value": value, "settings": settings}
        if i in status:
            v["status"] = status[i]
        else:
            r = combine_rounds(runs[i])
            v.update(r)
            v["speedup"] = r["fps"] / baseline["fps"]
            v["p50_ratio"] = r["latency_ms"]["p50"] / baseline["latency_ms"]["p50"]
            v["by_rollout_length"] = rollout_bins(r["latency_ms_per_frame"], cfg.cache_frames)
        result["variants"].append(v)
    if args.profile_frames:
        apply_settings(wm, base)
        result["profile"] = profile_frames(wm, trace, args.profile_frames)
    result["loadavg_after"] = _loadavg()
    if not args.no_plot:
        result["plot"] = png.name
    out.write_text(json.dumps(result, indent=1) + "\n")  # the numbers first, then their plot
    if not args.no_plot:
        plot(result, png)
    print(f"\n{result['model']['name']} ({'random weights' if args.preset else 'checkpoint'}), "
          f"{dev['name']} [{dev['type']}, {dev['threads']} threads], torch {torch.__version__}, "
          f"commit {str(result['commit'])[:12]}")
    print(f"{args.frames} timed frames per row{f' x {args.rounds} rounds' if args.rounds > 1 else ''} after "
          f"{args.warmup} warm-up frames; trace: {trace_src}; load average {result['loadavg_before']} -> "
          f"{result['loadavg_after']}")
    print_table(result)
    if "profile" in result:
        print_profile(result["profile"])
    print(f"\nwrote {out}" + ("" if args.no_plot else f" and {png}"))
    return 0
