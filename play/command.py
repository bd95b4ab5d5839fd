"""`worldmodel play`: its command line, and the game it names (the dream of a checkpoint or a preset, the
real game, a recording), handed to the loop (play/app.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

from worldmodel.errors import UserError
from worldmodel.files import check_output_path
from worldmodel.game.action import MAX_SCRIPT_FRAMES, ActionScript
from worldmodel.game.maps import add_wad_argument
from worldmodel.inference.loading import DEFAULT_CHECKPOINT, load_model
from worldmodel.inference.settings import add_engine_arguments, settings_from_args
from worldmodel.play.app import Options, PlayApp, check_display
from worldmodel.play.keymap import DEFAULT_SENSITIVITY, key_table

# drafts while a key is held: measured on the explorer trace (benchmarks/speed_doom-tiny_cpu.json), N = 2 is
# accepted ~84% of the time and gives the most frames/s; N = 4 is accepted less and costs more per miss
DEFAULT_SPECULATIVE = 2

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    try:
        rows = key_table()
    except Exception:  # pygame key names need no display, but be safe
        rows = []
    p.epilog = "keys:\n" + "\n".join(f"  {k:<28} {d}" for k, d in rows)
    src = p.add_argument_group("what to play")
    g = src.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", metavar="C", help=f"checkpoint folder or Hub id (default: {DEFAULT_CHECKPOINT})")
    g.add_argument("--preset", metavar="P", help="a preset with random weights (tiny, small, nfd-310m): no checkpoint "
                                                 "needed, the dream is noise")
    g.add_argument("--real", action="store_true", help="play the real game (ViZDoom) in the same window")
    g.add_argument("--replay", metavar="MP4", help="play back a recording")
    src.add_argument("--map", default="MAP01", help="map of the real game for start scenes and --real (default MAP01)")
    add_wad_argument(src)
    src.add_argument("--start", choices=("auto", "real", "clips"), default="auto",
                     help="start scenes: the real game on --map, or the clips shipped with the checkpoint "
                          "(auto: clips when the checkpoint has them)")
    m = p.add_argument_group("model")
    m.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default)")
    add_engine_arguments(m, ("steps", "context_noise", "speculative", "attention", "threads", "pipeline", "seed"),
                         defaults={"speculative": None},  # None: DEFAULT_SPECULATIVE, up to the model's max_draft
                         helps={"steps": "; +/- change it live",
                                "speculative": f" (default {DEFAULT_SPECULATIVE}: a held key is the common case "
                                               f"in play)"})
    w = p.add_argument_group("window")
    w.add_argument("--scale", type=int, help="integer scale of the frames (default: as large as fits the screen)")
    w.add_argument("--fullscreen", action="store_true")
    w.add_argument("--sensitivity", type=float, default=DEFAULT_SENSITIVITY,
                   help=f"mouse: degrees of turn per pixel (default {DEFAULT_SENSITIVITY})")
    w.add_argument("--side-by-side", action="store_true", help="start with the real game beside the dream (Tab)")
    w.add_argument("--no-hud", action="store_true", help="start with the HUD hidden (H)")
    w.add_argument("--no-grab", action="store_true", help="do not grab the mouse (turn with the arrow keys)")
    a = p.add_argument_group("demos, tests and measurements")
    a.add_argument("--autoplay", metavar="SCRIPT", help="take the actions from a JSON Lines action script (read "
                                                        f"as a stream, at most {MAX_SCRIPT_FRAMES} frames: 24 hours)")
    a.add_argument("--max-frames", type=int, metavar="N", help="stop after N generated frames (with --autoplay, "
                                                               "the script repeats until then)")
    a.add_argument("--report", metavar="FILE.json", help="write what the HUD shows as JSON when the loop ends")
    a.add_argument("--screenshot-at", nargs=2, action="append", default=[], metavar=("N", "PNG"),
                   help="save the window as PNG once N frames are generated (repeatable)")
    a.add_argument("--record-dir", default="recordings", help="where R saves recordings (default recordings/)")
    a.add_argument("--screenshot-dir", default="screenshots", help="where F12 saves screenshots")


NO_CHECKPOINT_ALTERNATIVES = ("try the engine with random weights (`worldmodel play --preset tiny`), or play the "
                              "real game (`worldmodel play --real`)")


def build_game(args):
    """The game named by the command line: the dream (checkpoint or preset), the real game or a replay."""
    from worldmodel.play.sources import ClipStarts, DreamGame, RealGame, RealStarts, ReplayGame

    if args.replay:
        if not Path(args.replay).exists():
            raise UserError(f"{args.replay}: no such recording")
        return ReplayGame(args.replay), args.replay
    if args.real:
        return RealGame(RealStarts(args.map, args.wad, seed=args.seed, context=1)), f"real {args.wad} {args.map}"

    model = load_model(args, NO_CHECKPOINT_ALTERNATIVES, settings_from_args(args))
    if args.speculative is None:
        model.configure(speculative=min(DEFAULT_SPECULATIVE, model.cfg.max_draft))
    label = f"preset {args.preset} (random weights)" if args.preset else args.checkpoint or str(model.folder)
    context = model.cfg.cache_frames
    real_starts = RealStarts(args.map, args.wad, frame_size=model.frame_size, seed=args.seed, context=context)
    starts = real_starts
    if args.start in ("auto", "clips") and model.folder is not None:
        clips = model.start_clips()
        if clips:
            starts = ClipStarts(clips, context=context, name=f"{Path(model.folder).name} clip")
        elif args.start == "clips":
            raise UserError(f"{model.folder} ships no start clips (start_clips/*.npz); use --start real")
    elif args.start == "clips":
        raise UserError("--start clips needs a checkpoint that ships start clips")
    return DreamGame(model, starts, real_starts=real_starts), label


def options_from_args(args) -> Options:
    """The session's options, the script read and the output paths checked: run before the game loads."""
    autoplay = None
    if args.autoplay:
        autoplay = ActionScript(args.autoplay)
    if args.max_frames is not None and args.max_frames < 1:
        raise UserError(f"--max-frames must be at least 1, got {args.max_frames}")
    if args.scale is not None and args.scale < 1:
        raise UserError(f"--scale must be at least 1, got {args.scale}")
    shots = []
    for n, path in args.screenshot_at:
        try:
            shots.append((int(n), Path(path)))
        except ValueError:
            raise UserError(f"--screenshot-at takes a frame number and a path, got {n!r} {path!r}") from None
        check_output_path(path, "--screenshot-at")
    if args.report:
        check_output_path(args.report, "--report")
    return Options(scale=args.scale, fullscreen=args.fullscreen, sensitivity=args.sensitivity, autoplay=autoplay,
                   max_frames=args.max_frames, report=Path(args.report) if args.report else None,
                   record_dir=Path(args.record_dir), screenshot_dir=Path(args.screenshot_dir), screenshot_at=shots,
                   side_by_side=args.side_by_side, hud=not args.no_hud, grab_mouse=not args.no_grab)


def run(args) -> int:
    check_display()
    opts = options_from_args(args)  # a bad script or output path fails before the game loads
    game, opts.checkpoint = build_game(args)
    try:
        report = PlayApp(game, opts).run()
    finally:
        game.close()
    fps = report.get("displayed_fps")
    print(f"worldmodel play: {report['frames_generated']} frames generated, "
          f"{'-' if fps is None else fps} displayed frames/s (target {report['target_fps']:g}), latency p50 "
          f"{report['latency_ms_p50']} ms, p99 {report['latency_ms_p99']} ms"
          + (f"; report: {args.report}" if args.report else ""))
    return 0
