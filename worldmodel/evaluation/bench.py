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

Code: the measurement in timing.py, the action trace in traces.py, the table and the plot in bench_report.py.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

from worldmodel.game.action import save_actions
from worldmodel.device import device_info, device_tag, memory_kind
from worldmodel.evaluation.bench_report import plot, print_profile, print_table
from worldmodel.evaluation.timing import (apply_settings, combine_rounds, current_settings, extra_settings, measure,
                                          profile_frames, rollout_bins)
from worldmodel.evaluation.traces import DEFAULT_TRACE, load_trace, trace_summary
from worldmodel.files import check_output_path
from worldmodel.inference.loading import add_model_arguments, load_model, model_name
from worldmodel.inference.settings import SWEPT, add_engine_arguments, sweep_from_args
from worldmodel.provenance import provenance
from worldmodel.errors import UserError

SCHEMA_VERSION = 1


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
