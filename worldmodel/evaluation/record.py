"""`worldmodel record`: headless rollouts of the world model, written in the recording format of
`worldmodel.data.recording` (PREFIX.mp4 + PREFIX.actions.jsonl + PREFIX.meta.json + PREFIX.timings.csv).

    worldmodel record --actions walk.jsonl --frames 350 --out runs/walk
    worldmodel record --preset tiny --policy explorer --frames 700 --seed 0,1,2 --out runs/ --side-by-side

Start scene: the real game (`DoomEnv`) on --map, reset with the seed, standing still for --context frames
(`worldmodel.game.scenes`);
or, with --start-clip, a start clip shipped in the checkpoint folder (start_clips/*.npz).
Actions: one or more action scripts (JSON Lines; a recording's PREFIX.actions.jsonl replays it), or the
built-in explorer policy, which looks through the real game's eyes (depth, position) while the real game
runs beside the model (it always does when the start scene came from the game: it is cheap), blind otherwise.
--side-by-side writes [model | real game] frames, the real game fed the same actions.
--strip N also writes PREFIX.png: N evenly spaced frames in a row (with --side-by-side, the model's
row above the real game's), for a look at a whole rollout in one image.
Deterministic for a seed: the sampler, the policy and the game are all seeded with it.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np

from worldmodel.game.action import MAX_SCRIPT_FRAMES, ActionScript
from worldmodel.files import check_output_path
from worldmodel.inference.loading import add_model_arguments, load_model
from worldmodel.inference.settings import add_engine_arguments, settings_from_args
from worldmodel.provenance import command_line
from worldmodel.errors import UserError
from worldmodel.game.maps import add_wad_argument


def write_strip(path: Path, frames: list[np.ndarray], rows: int = 1) -> None:
    """Frames (H, rows*W, 3) side by side in one PNG; a frame holding `rows` panes left to right is
    laid out as `rows` rows (the model above the real game)."""
    import cv2

    panes = [np.concatenate(np.split(f, rows, axis=1), axis=0) for f in frames]  # (rows*H, W, 3) each
    image = np.concatenate(panes, axis=1)
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise UserError(f"{path}: could not write the strip")


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--actions", nargs="+", metavar="SCRIPT",
                     help="action script(s), JSON Lines (a recording's PREFIX.actions.jsonl replays it); read as "
                          f"a stream, at most {MAX_SCRIPT_FRAMES} frames (24 hours) each")
    src.add_argument("--policy", choices=["explorer"], help="a built-in policy instead of a script")
    parser.add_argument("--frames", type=int, metavar="N",
                        help="frames to generate (default: the whole script; 350 for a policy)")
    parser.add_argument("--out", required=True, metavar="PREFIX",
                        help="output prefix (PREFIX.mp4, .actions.jsonl, .meta.json, .timings.csv); a folder "
                             "(existing, or ending in /) names the files after the script and seed")
    parser.add_argument("--map", default="MAP01", help="start scene from the real game on this map (default MAP01)")
    add_wad_argument(parser)
    parser.add_argument("--start-clip", type=int, metavar="I",
                        help="start from the checkpoint's start clip I instead of the game")
    parser.add_argument("--context", type=int, metavar="N", help="context frames (default: the model's cache size)")
    add_engine_arguments(parser, ("seed", "steps", "context_noise", "speculative", "attention"), lists=("seed",),
                         defaults={"seed": "0"}, helps={"seed": ": one recording each, and its game's seed (default 0)"})
    parser.add_argument("--side-by-side", action="store_true", help="write [model | real game] frames")
    parser.add_argument("--strip", type=int, default=0, metavar="N",
                        help="also write PREFIX.png: N evenly spaced frames (with --side-by-side: model above, "
                             "real game below)")
    parser.add_argument("--crf", type=int, default=17, help="H.264 quality, 0 (lossless) to 51 (default 17)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _jobs(args) -> list[tuple[str, ActionScript | None, int]]:
    seeds = args.seed  # integers (settings.add_engine_arguments)
    if args.actions:
        scripts = [(Path(p).name.removesuffix(".jsonl").removesuffix(".actions"), ActionScript(p))
                   for p in args.actions]
    else:
        scripts = [(args.policy, None)]
    return [(name, acts, seed) for (name, acts), seed in itertools.product(scripts, seeds)]


def strip_path(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + ".png")


def _prefixes(out: str, jobs) -> list[Path]:
    is_dir = out.endswith(("/", "\\")) or Path(out).is_dir()
    if len(jobs) == 1 and not is_dir:
        return [Path(out)]
    names = [f"{name}_seed{seed}" for name, _, seed in jobs]
    if len(set(names)) < len(names):  # the same script name twice: number them
        names = [f"{i:02d}_{n}" for i, n in enumerate(names)]
    return [Path(out) / n if is_dir else Path(f"{out}_{n}") for n in names]


def run(args) -> int:
    from worldmodel.progress import progress_bar

    from worldmodel.game.maps import check_map
    from worldmodel.data.recording import Recorder, model_meta, paths

    for name in ("frames", "context"):  # the engine's settings are checked as they are parsed (settings.py)
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    if args.strip < 0:
        raise UserError(f"--strip must be 0 (off) or more frames, got {args.strip}")
    if not 0 <= args.crf <= 51:
        raise UserError(f"--crf must be 0..51, got {args.crf}")
    jobs = _jobs(args)  # reads the scripts first: a bad script fails before the model loads
    prefixes = _prefixes(args.out, jobs)
    for prefix in prefixes:  # and the outputs: a place that cannot be written fails now, not after the rollout
        for path in [*paths(prefix).values(), *([strip_path(prefix)] if args.strip else [])]:
            check_output_path(path)
    map_name = check_map(args.wad, args.map, "any")
    if args.side_by_side and args.start_clip is not None:
        raise UserError("--side-by-side needs the real game's start scene, not --start-clip")
    wm = load_model(args, settings=settings_from_args(args))  # --seed: each recording's (wm.seed below)
    context = args.context or wm.cfg.cache_frames
    clips = None
    if args.start_clip is not None:
        clips = wm.start_clips()
        if not clips:
            raise UserError("--start-clip: this checkpoint ships no start clips (start_clips/*.npz)")
        if not 0 <= args.start_clip < len(clips):
            raise UserError(f"--start-clip: choose 0..{len(clips) - 1}")
    H, W = wm.frame_size

    for (name, script, seed), prefix in zip(jobs, prefixes):
        n = args.frames or (len(script) if script is not None else 350)
        if script is not None and n > len(script):
            print(f"worldmodel record: {name} holds {len(script)} actions; recording {len(script)} frames, "
                  f"not {n}", file=sys.stderr)
            n = len(script)
        policy, script_actions = None, iter(script) if script is not None else None
        if script is None:
            from worldmodel.game.policy import ExplorerPolicy

            policy = ExplorerPolicy(seed)
        env = None
        if clips is not None:
            frames, actions = clips[args.start_clip]
            frames, actions = frames[-context:], actions[-context:]
            start = {"source": "start_clip", "index": args.start_clip, "frames": len(frames)}
        else:
            from worldmodel.game.doom import DoomEnv
            from worldmodel.game.scenes import start_scene

            env = DoomEnv(wad=args.wad, map=map_name, seed=seed, frame_size=(H, W), depth=policy is not None)
            frames, actions = start_scene(env, seed, context - 1).context()  # standing still
            start = {"source": "game", "wad": args.wad, "map": map_name, "seed": seed, "frames": len(frames),
                     "actions": "stand still"}
        wm.seed = seed
        wm.reset(frames, actions)
        wm.reset_stats()
        meta = model_meta(wm)
        meta.update({"command": command_line(),
                     "start_scene": start, "frames_requested": n,
                     "actions_source": f"policy {args.policy} seed {seed}" if policy else f"script {name}",
                     "layout": "model | real game" if args.side_by_side else "model",
                     "model_frame_size": [H, W]})
        size = (H, 2 * W) if args.side_by_side else (H, W)
        strip_at = set(np.linspace(0, n - 1, min(args.strip, n)).round().astype(int).tolist()) if args.strip else set()
        strip = []
        t0 = time.perf_counter()
        with Recorder(prefix, wm.fps, size, meta, crf=args.crf) as rec, \
                progress_bar(total=n, unit="frame", desc=prefix.name, disable=args.no_progress) as bar:
            for i in range(n):
                if policy is not None:
                    a = policy.act(env.position, env.depth) if env is not None else policy.act()
                else:
                    a = next(script_actions)
                t = time.perf_counter()
                frame = wm.step(a)
                ms = (time.perf_counter() - t) * 1000
                if env is not None:
                    real = env.step(a)
                    if args.side_by_side:
                        frame = np.concatenate([frame, real], axis=1)
                if i in strip_at:
                    strip.append(frame)
                rec.add(frame, a, latency_ms=ms)
                bar.update(1)
                if i % 10 == 9:
                    bar.set_postfix(fps=f"{(i + 1) / (time.perf_counter() - t0):.1f}", refresh=False)
            rec.update_meta(engine_stats=wm.stats)
        if env is not None:
            env.close()
        if strip:
            write_strip(strip_path(prefix), strip, rows=2 if args.side_by_side else 1)
        secs = time.perf_counter() - t0
        print(f"wrote {rec.paths['video']} ({rec.frames} frames, {rec.frames / secs:.1f} frames/s), "
              f"{rec.paths['actions'].name}, {rec.paths['meta'].name}, {rec.paths['timings'].name}")
    return 0
