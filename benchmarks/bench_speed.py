"""Issue 15's benchmark: frames/s at the defaults on a CPU, the old arrangement against the new one in
one run, what each change bought, and what the quality costs of the speed knobs are. One command,
for any checkpoint:

    python benchmarks/bench_speed.py                                        # the shipped checkpoint
    python benchmarks/bench_speed.py --checkpoint checkpoints/doom-map01 --out benchmarks/speed_doom-map01_cpu.json
    python benchmarks/bench_speed.py --only engine,play                     # a part of it

Sections (--only / --skip pick them):
- engine: `worldmodel bench`'s measurement (frames the way the engine runs them; frames/s from a
  one-frame context, cache filling then full) of a ladder of changes, each row adding one to the row
  before, measured in interleaved rounds so that a change in machine load hits every row alike:
    old: 2 intra-op threads (OpenMP passive waiting), decoding in line, linear weights unpacked
    1 thread: one intra-op thread
    + packed weights: oneDNN-packed linear weights (model.pack_linears)
    + pipeline: frame t decoded on a second thread while frame t+1 is generated = the new default
    + bf16: bfloat16 (only where the CPU has native bf16; the default there)
  then the new default with two intra-op threads, at one step fewer, and with speculative drafts (N = 2, 4; acceptance on the explorer
  trace, benchmarks/traces/); then old and new again with one core kept busy by another process
  (`python -c "while True: pass"`) for the whole measurement;
- profile: where a frame's time goes at the defaults (timing.profile_frames: transformer passes, the
  fused commit, decode, colour conversion), plus the display stages from the play runs;
- play: `worldmodel play --autoplay play/demo_actions.jsonl --max-frames N --report` (SDL dummy
  driver): old defaults (--threads 2 --pipeline off --speculative 1), the new arrangement without
  drafts (--speculative 1) and the new defaults, idle and with one core busy;
- compile: eager against the engine's torch.compile (inductor) of the per-frame passes and decoder (on a
  CPU with the weights frozen into the graph: engine.compile_options): steady-state frames/s (one thread,
  plain loop) and the first frame's compile time from a cold cache, each in a fresh process;
- quality: PSNR of rollouts against the real game on the eval's setting (`worldmodel eval`'s maps,
  episodes, context and warm-up; horizons 1, 8, 35): float32 at the checkpoint's steps (reference)
  against bfloat16, one step fewer, and speculative N = 2, 4, all from the same contexts and actions.
The JSON names the box (CPU model, flags that matter, cores, load average), the commit, the command.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("engine", "profile", "play", "compile", "quality")
PLAY_SCRIPT = ROOT / "play" / "demo_actions.jsonl"
# the play rows: the old defaults (2 threads, decoding in line, no drafts), the new arrangement without
# drafts, and the new defaults
PLAY_ROWS = (("old", ["--threads", "2", "--pipeline", "off", "--speculative", "1"]),
             ("new, no drafts", ["--speculative", "1"]),
             ("new", []))
QUALITY_HORIZONS = (1, 8, 35)


def box() -> dict:
    """The machine, by what decides these numbers."""
    from worldmodel.device import cpu_name
    from worldmodel.device import cpu_cores, native_bf16

    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"cpu": cpu_name(), "cores": cpu_cores(), "platform": platform.platform(),
            "flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni", "fma"}),
            "native_bf16": native_bf16(), "loadavg": list(os.getloadavg())}


@contextmanager
def busy_core():
    """Another process keeping one core busy for the duration."""
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield p.pid
    finally:
        p.kill()
        p.wait()


# --------------------------------------------------------------------------------------------------
# engine
# --------------------------------------------------------------------------------------------------
def ladder_rows(steps: int, bf16: bool) -> list[tuple[str, dict]]:
    old = {"threads": 2, "pipeline": False, "packed": False, "dtype": "float32", "speculative": 1, "steps": steps}
    rows = [("old", old),
            ("1 thread", dict(old, threads=1)),
            ("+ packed weights", dict(old, threads=1, packed=True)),
            ("+ pipeline", dict(old, threads="auto", packed=True, pipeline=True))]
    if bf16:
        rows.append(("+ bf16", dict(rows[-1][1], dtype="bfloat16")))
    new = dict(rows[-1][1])
    rows.append(("new, 2 threads", dict(new, threads=2)))  # the pipeline with two intra-op threads: 3 on 2 cores
    if steps > 1:
        rows.append((f"new, {steps - 1} step{'s' if steps > 2 else ''}", dict(new, steps=steps - 1)))
    rows += [(f"new, speculative {n}", dict(new, speculative=n)) for n in (2, 4)]
    return rows


def new_default(steps: int, bf16: bool) -> tuple[str, dict]:
    """The ladder's last change: the engine's defaults."""
    return ladder_rows(steps, bf16)[4 if bf16 else 3]


def apply(models: dict, row: dict):
    from worldmodel.model.linear import pack_linears

    wm = models[row["dtype"]]
    wm.threads, wm.pipeline = row["threads"], row["pipeline"]
    wm.steps, wm.speculative = row["steps"], row["speculative"]
    pack_linears(wm.transformer, pack=row["packed"])
    return wm


def measure_rows(models, rows, trace, frames, warmup, rounds, progress) -> list[dict]:
    from worldmodel.evaluation.timing import combine_rounds, measure

    runs: list[list[dict]] = [[] for _ in rows]
    for rnd in range(rounds):
        order = list(range(len(rows)))
        order = order[rnd % len(rows):] + order[:rnd % len(rows)]
        for i in order:
            name, row = rows[i]
            progress(f"engine: {name} (round {rnd + 1}/{rounds})")
            wm = apply(models, row)
            r = measure(wm, trace, frames, warmup)
            r["threads_used"] = wm.threads
            r["loadavg"] = os.getloadavg()[0]
            runs[i].append(r)
    out = []
    for (name, row), rs in zip(rows, runs):
        r = combine_rounds(rs)
        r.pop("latency_ms_per_frame", None)
        out.append({"name": name, "settings": row, **r})
    base = out[0]["fps"]
    for r in out:
        r["x_old"] = r["fps"] / base
    return out


def engine_section(args, models, trace, progress) -> dict:
    steps = models["float32"].steps
    rows = ladder_rows(steps, "bfloat16" in models)
    res = {"frames": args.frames, "warmup": args.warmup, "rounds": args.rounds,
           "idle": measure_rows(models, rows, trace, args.frames, args.warmup, args.rounds, progress)}
    new_name = new_default(steps, "bfloat16" in models)[0]
    busy_rows = [r for r in rows if r[0] in ("old", new_name)]
    with busy_core():
        res["one_core_busy"] = measure_rows(models, busy_rows, trace, args.frames, args.warmup, args.rounds, progress)
    res["new_default"] = new_name
    return res


# --------------------------------------------------------------------------------------------------
# play
# --------------------------------------------------------------------------------------------------
def play_run(args, extra: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "worldmodel.cli", "play", "--autoplay", str(PLAY_SCRIPT),
           "--max-frames", str(args.play_frames), "--report", str(out), "--no-hud"] + args.model_flags + extra
    env = dict(os.environ, SDL_VIDEODRIVER="dummy", SDL_AUDIODRIVER="dummy")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        return {"status": f"failed: {(p.stderr or p.stdout).strip().splitlines()[-1:]}",
                "command": " ".join(cmd[2:])}
    r = json.loads(out.read_text())
    keep = ("displayed_fps", "target_fps", "frames_generated", "latency_ms_p50", "latency_ms_p99", "latency_ms_max",
            "model_ms_p50", "model_ms_p99", "max_screen_gap_ms", "profile_ms", "pipelined", "torch_threads",
            "dtype", "steps", "speculative", "acceptance_rate", "load_average", "ui_thread_cpu_fraction")
    return {"status": "ok", "command": "worldmodel " + " ".join(cmd[3:]).replace(str(ROOT) + "/", ""),
            **{k: r.get(k) for k in keep}}


def play_section(args, progress) -> dict:
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for load in ("idle", "one_core_busy"):
            rows = {}
            for rnd in range(args.play_rounds):
                for name, extra in (PLAY_ROWS if rnd % 2 == 0 else PLAY_ROWS[::-1]):
                    progress(f"play: {name}, {load} (round {rnd + 1}/{args.play_rounds})")
                    out = Path(tmp) / f"{load}_{name}_{rnd}.json"
                    if load == "idle":
                        r = play_run(args, extra, out)
                    else:
                        with busy_core():
                            r = play_run(args, extra, out)
                    rows.setdefault(name, []).append(r)
            res[load] = rows
    return res


# --------------------------------------------------------------------------------------------------
# compile (each measurement in a fresh process with its own inductor cache: a cold compile)
# --------------------------------------------------------------------------------------------------
def compile_job(spec: dict) -> dict:
    import torch

    from worldmodel.evaluation.timing import context_frames, measure
    from worldmodel.evaluation.traces import load_trace
    from worldmodel.inference.loading import load_model

    wm = load_model(argparse.Namespace(**spec["model"]), threads=1, pipeline=False)
    trace, _ = load_trace(None, 1000)
    f, a = context_frames(wm, wm.cfg.cache_frames)
    out = {}
    if spec["compile"]:
        wm.reset(f, a)
        wm.step(trace[0])  # eager: the first frame after a reset commits nothing (another graph), not timed
        wm.compile = True
        t = time.perf_counter()
        wm.step(trace[1])
        out["first_frame_s"] = time.perf_counter() - t
        t = time.perf_counter()
        wm.step(trace[2])
        out["second_frame_s"] = time.perf_counter() - t
    r = measure(wm, trace, spec["frames"], spec["warmup"])
    out.update(fps=r["fps"], latency_ms=r["latency_ms"], warmup_s=r["warmup_s"], threads=torch.get_num_threads())
    return out


def compile_section(args, progress) -> dict:
    res = {}
    for name, spec in (("eager", {"compile": False}), ("compiled", {"compile": True})):
        progress(f"compile: {name}")
        spec = dict(spec, frames=args.frames, warmup=args.warmup, model=vars(args.model_ns))
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
            p = subprocess.run([sys.executable, __file__, "--compile-job", json.dumps(spec)], cwd=ROOT, env=env,
                               capture_output=True, text=True)
        if p.returncode != 0:
            res[name] = {"status": f"failed: {(p.stderr or p.stdout).strip().splitlines()[-1:]}"}
            continue
        res[name] = {"status": "ok", **json.loads(p.stdout.strip().splitlines()[-1])}
    if res.get("eager", {}).get("status") == "ok":
        for r in res.values():
            if r.get("status") == "ok":
                r["x_eager"] = r["fps"] / res["eager"]["fps"]
    return res


# --------------------------------------------------------------------------------------------------
# quality
# --------------------------------------------------------------------------------------------------
def quality_section(args, models, progress) -> dict:
    from worldmodel.evaluation import evaluate
    from worldmodel.evaluation.rollouts import Episode
    from worldmodel.game.maps import VAL_MAPS, parse_maps
    from worldmodel.metrics import frame_stats, mean_psnr, psnr

    p = argparse.ArgumentParser()
    evaluate.add_arguments(p)
    ev = p.parse_args(["--out", "-"])  # the eval's own defaults: its maps, episodes, warm-up, seed
    maps = parse_maps(ev.maps) if ev.maps else list(VAL_MAPS)  # the eval's validation maps
    episodes = args.quality_episodes or ev.episodes
    wm = models["float32"]
    steps = wm.steps
    context = wm.cfg.cache_frames
    hmax = max(QUALITY_HORIZONS)
    variants = [("float32", "float32", steps, 1)]
    variants.append(("bfloat16", "bfloat16", steps, 1))
    if steps > 1:
        variants.append((f"{steps - 1} step{'s' if steps > 2 else ''}", "float32", steps - 1, 1))
    variants += [(f"speculative {n}", "float32", steps, n) for n in (2, 4)]
    psnrs = {name: [] for name, *_ in variants}
    sharp = {name: [] for name, *_ in variants}  # sharpness (Laplacian variance) of generated / real frames
    copy = []
    for mi, m in enumerate(maps):
        for e in range(episodes):
            seed = ev.seed + e
            progress(f"quality: {m} episode {e + 1}/{episodes}")
            ep = Episode(ev.wad or "freedoom2", m, seed, wm.frame_size, context, ev.warmup, policy_seed=seed * 100 + mi)
            try:
                actions, real = [], []
                for _ in range(hmax):
                    a = ep.policy.act(ep.env.position, ep.env.depth)
                    f = ep.env.step(a)
                    if ep.env.restarted:
                        break
                    actions.append(a)
                    real.append(f)
            finally:
                ep.close()
            copy.append([psnr(ep.ctx_frames[-1], r) for r in real])
            for name, dtype, k, n in variants:
                model = models.get(dtype) or models.setdefault(dtype, _load(args, dtype))
                model.steps, model.speculative, model.seed = k, n, seed
                model.reset(ep.ctx_frames, ep.ctx_actions)
                gen = [model.step(a) for a in actions]
                psnrs[name].append([psnr(g, r) for g, r in zip(gen, real)])
                sharp[name] += [frame_stats(g)["sharpness"] / max(frame_stats(r)["sharpness"], 1e-6)
                                for g, r in zip(gen, real)]
    wm.steps, wm.speculative = steps, 1

    def at(curves, h):
        vals = [c[h - 1] for c in curves if len(c) >= h]
        return mean_psnr(vals)

    def mean_to(curves, h):
        return mean_psnr([x for c in curves for x in c[:h]])

    res = {"maps": maps, "episodes_per_map": episodes, "context": context, "warmup": ev.warmup, "seed": ev.seed,
           "horizons": list(QUALITY_HORIZONS), "reference": "float32", "copy_last": {}, "variants": {}}
    for h in QUALITY_HORIZONS:
        res["copy_last"][str(h)] = at(copy, h)
    ref = psnrs["float32"]
    for name, dtype, k, n in variants:
        row = {"dtype": dtype, "steps": k, "speculative": n, "psnr_db": {}, "mean_psnr_1_to_h_db": {},
               "delta_vs_reference_db": {}, "sharpness_ratio": float(np.mean(sharp[name]))}
        for h in QUALITY_HORIZONS:
            row["psnr_db"][str(h)] = at(psnrs[name], h)
            row["mean_psnr_1_to_h_db"][str(h)] = mean_to(psnrs[name], h)
            row["delta_vs_reference_db"][str(h)] = mean_to(psnrs[name], h) - mean_to(ref, h)
        res["variants"][name] = row
    return res


def _load(args, dtype: str):
    from worldmodel.inference.loading import load_model

    return load_model(args.model_ns, dtype=dtype)


# --------------------------------------------------------------------------------------------------
def summarise(res: dict) -> dict:
    """The issue's targets against what was measured."""
    out = {}
    eng = res.get("engine")
    if eng:
        new = next(r for r in eng["idle"] if r["name"] == eng["new_default"])
        out["bench_fps_new_idle"] = new.get("fps_cache_full", new["fps"])
        out["bench_target_60_fps"] = out["bench_fps_new_idle"] >= 60
    play = res.get("play")
    if play:
        def med(rows, key):
            v = [r[key] for r in rows if r.get("status") == "ok" and r.get(key) is not None]
            return float(np.median(v)) if v else None
        out["play_displayed_fps_new_idle"] = med(play["idle"]["new"], "displayed_fps")
        out["play_displayed_fps_old_idle"] = med(play["idle"]["old"], "displayed_fps")
        out["play_displayed_fps_new_one_core_busy"] = med(play["one_core_busy"]["new"], "displayed_fps")
        out["play_latency_p99_ms_new_one_core_busy"] = med(play["one_core_busy"]["new"], "latency_ms_p99")
        out["play_displayed_fps_old_one_core_busy"] = med(play["one_core_busy"]["old"], "displayed_fps")
        f = out["play_displayed_fps_new_idle"]
        out["play_target_34_fps_idle"] = f is not None and f >= 34
        fb, p99 = out["play_displayed_fps_new_one_core_busy"], out["play_latency_p99_ms_new_one_core_busy"]
        out["play_target_30_fps_p99_100ms_busy"] = fb is not None and fb >= 30 and p99 is not None and p99 <= 100
    q = res.get("quality")
    if q:
        d = q["variants"]["bfloat16"]["delta_vs_reference_db"]
        out["bf16_psnr_delta_db"] = d
        out["bf16_target_within_0.1_db"] = all(abs(v) <= 0.1 for v in d.values() if v is not None)
    return out


def markdown(res: dict) -> str:
    """The result's tables in Markdown, for the README (numbers from the JSON, nothing typed in)."""
    f = lambda v, spec=".1f": "-" if v is None else format(v, spec)  # noqa: E731
    b = res["box"]
    lines = [f"{b['cpu']}, {b['cores']} cores ({', '.join(b['flags'])}), torch {res['torch']}, commit "
             f"{str(res['commit'])[:10]}, {res['model']['name']} at {res['model']['steps']} steps; load average "
             f"{b['loadavg'][0]:.1f} before the run" + (f"; run in a scheduler autogroup at nice "
                                                          f"{res['autogroup'].split()[-1]} (ahead of other jobs)"
                                                          if "nice -" in (res.get("autogroup") or "") else "") + ".", ""]
    eng = res.get("engine")
    if eng:
        lines += ["| engine (`worldmodel bench` measurement) | frames/s | x old | cpu fps | latency p50 / p99 ms | accepted |",
                  "|---|---|---|---|---|---|"]
        for load, suffix in (("idle", ""), ("one_core_busy", ", one core busy")):
            for r in eng[load]:
                accepted = f(r.get("acceptance_rate"), ".2f") if load == "idle" else "-"
                lines.append(f"| {r['name']}{suffix} | {f(r['fps'])} | {f(r['x_old'], '.2f')} | "
                             f"{f(r.get('fps_cpu_time'))} | {f(r['latency_ms']['p50'], '.0f')} / "
                             f"{f(r['latency_ms']['p99'], '.0f')} | {accepted} |")
        lines.append("")
    play = res.get("play")
    if play:
        lines += ["| `worldmodel play --autoplay` | displayed frames/s | latency p50 / p99 ms |", "|---|---|---|"]
        for load, rows in play.items():
            for name, runs in rows.items():
                for r in runs:
                    if r.get("status") == "ok":
                        lines.append(f"| {name} ({'idle' if load == 'idle' else 'one core busy'}) | "
                                     f"{f(r['displayed_fps'])} | {f(r['latency_ms_p50'], '.0f')} / "
                                     f"{f(r['latency_ms_p99'], '.0f')} |")
        lines.append("")
    prof = res.get("profile")
    if prof:
        shown = next((r for r in (play or {}).get("idle", {}).get("new", []) if r.get("status") == "ok"), None)
        lines += ["| stage (ms a frame, p50) | |", "|---|---|"]
        lines += [f"| {k} | {v['p50']:.1f} |" for k, v in prof["stages"].items()]
        if shown:
            lines += [f"| play: {k} | {v['p50']:.1f} |" for k, v in shown["profile_ms"].items()]
        lines.append("")
    comp = res.get("compile")
    if comp:
        lines += ["| torch.compile | frames/s | x eager | first frame (compile) s |", "|---|---|---|---|"]
        for name, r in comp.items():
            if r.get("status") == "ok":
                lines.append(f"| {name} | {f(r['fps'])} | {f(r.get('x_eager'), '.2f')} | {f(r.get('first_frame_s'))} |")
            else:
                lines.append(f"| {name} | {r.get('status')} | | |")
        lines.append("")
    q = res.get("quality")
    if q:
        hs = q["horizons"]
        lines += ["| quality vs real game | " + " | ".join(f"PSNR 1-{h} dB" for h in hs) + " | vs float32 (1-"
                  f"{hs[-1]}) | sharpness / real |", "|---" * (len(hs) + 3) + "|"]
        for name, r in q["variants"].items():
            lines.append(f"| {name} | " + " | ".join(f(r['mean_psnr_1_to_h_db'][str(h)], '.2f') for h in hs)
                         + f" | {f(r['delta_vs_reference_db'][str(hs[-1])], '+.2f')} | {f(r['sharpness_ratio'], '.3f')} |")
        lines.append(f"\n({len(q['maps'])} maps x {q['episodes_per_map']} episodes: {', '.join(q['maps'])}.)")
    return "\n".join(lines)


def _autogroup() -> str | None:
    try:
        return Path("/proc/self/autogroup").read_text().strip()
    except OSError:
        return None


def own_autogroup(nice: int) -> None:
    """Re-run this script in a new session (a new scheduler autogroup) whose niceness is `nice`."""
    if os.environ.get("WM_BENCH_AUTOGROUP") != str(nice):
        os.environ["WM_BENCH_AUTOGROUP"] = str(nice)
        os.execvp("setsid", ["setsid", "-w", sys.executable] + sys.argv)
    Path("/proc/self/autogroup").write_text(str(nice))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", help="checkpoint folder (default: the shipped one)")
    g.add_argument("--preset", help="random weights in a preset's shape")
    ap.add_argument("--out", help="JSON (default benchmarks/speed_<model>_cpu.json)")
    ap.add_argument("--only", help=f"comma-separated sections of {','.join(SECTIONS)}")
    ap.add_argument("--skip", default="", help="comma-separated sections to leave out")
    ap.add_argument("--frames", type=int, default=200, help="timed frames per engine measurement (default 200)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the engine ladder (default 2)")
    ap.add_argument("--profile-frames", type=int, default=100, help="frames of the profile (default 100)")
    ap.add_argument("--play-frames", type=int, default=600, help="frames per play run (default 600)")
    ap.add_argument("--play-rounds", type=int, default=1)
    ap.add_argument("--quality-episodes", type=int, help="episodes per map (default: the eval's)")
    ap.add_argument("--priority", type=int, metavar="NICE",
                    help="Linux, root: run in a scheduler autogroup of its own at this niceness (e.g. -15), ahead "
                         "of other sessions' jobs on a shared machine: a stand-in for an idle one (a plain nice "
                         "value does not reach across sessions). The busy-core process and the play runs are in the "
                         "same group. Recorded in the JSON")
    ap.add_argument("--markdown", metavar="FILE.json", help="print a result's tables as Markdown and exit")
    ap.add_argument("--compile-job", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    if args.compile_job:
        print(json.dumps(compile_job(json.loads(args.compile_job))))
        return 0

    if args.priority is not None:
        own_autogroup(args.priority)
    from worldmodel.evaluation.traces import load_trace
    from worldmodel.device import device_info
    from worldmodel.inference.loading import load_model, model_name
    from worldmodel.device import native_bf16
    from worldmodel.provenance import git_commit

    only = set(args.only.split(",")) if args.only else set(SECTIONS)
    only -= set(filter(None, args.skip.split(",")))
    unknown = only - set(SECTIONS)
    if unknown:
        ap.error(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    args.model_ns = argparse.Namespace(checkpoint=args.checkpoint, preset=args.preset, device="cpu")
    args.model_flags = (["--checkpoint", args.checkpoint] if args.checkpoint else
                        ["--preset", args.preset] if args.preset else []) + ["--device", "cpu"]
    models = {"float32": load_model(args.model_ns, dtype="float32")}
    if native_bf16():
        models["bfloat16"] = load_model(args.model_ns, dtype="bfloat16")
    name = model_name(args.model_ns, models["float32"])
    out = Path(args.out or ROOT / "benchmarks" / f"speed_{name}_cpu.json")
    trace, trace_src = load_trace(None, 1000)
    t0 = time.time()

    def progress(msg):
        print(f"[{time.time() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)

    import torch

    res = {"tool": "benchmarks/bench_speed.py", "command": "python " + " ".join([sys.argv[0]] + sys.argv[1:]),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": git_commit(), "torch": torch.__version__,
           "python": platform.python_version(), "box": box(), "device": device_info("cpu"),
           "model": {"name": name, "checkpoint": str(models["float32"].folder or ""), "steps": models["float32"].steps,
                     "tokens_per_frame": models["float32"].cfg.tokens_per_frame,
                     "cache_frames": models["float32"].cfg.cache_frames},
           "trace": trace_src, "sections": sorted(only), "autogroup": _autogroup()}
    if "engine" in only:
        res["engine"] = engine_section(args, models, trace, progress)
    if "profile" in only:
        from worldmodel.evaluation.timing import profile_frames

        progress("profile")
        wm = apply(models, new_default(models["float32"].steps, "bfloat16" in models)[1])
        res["profile"] = profile_frames(wm, trace, args.profile_frames)
    if "play" in only:
        res["play"] = play_section(args, progress)
    if "compile" in only:
        res["compile"] = compile_section(args, progress)
    if "quality" in only:
        res["quality"] = quality_section(args, models, progress)
    res["summary"] = summarise(res)
    res["loadavg_after"] = list(os.getloadavg())
    res["wall_s"] = round(time.time() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)

    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    out.write_text(json.dumps(clean(res), indent=1) + "\n")
    print(json.dumps(res["summary"], indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
