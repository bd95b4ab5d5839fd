"""Regenerate the README screenshots of the play window, in one command:

    python -m worldmodel.play.screenshot                      # the shipped checkpoint, or --preset tiny without one
    python -m worldmodel.play.screenshot --checkpoint DIR     # any checkpoint
    python -m worldmodel.play.screenshot --preset tiny

It runs `worldmodel play` twice on a real X display (under `xvfb-run` when there is none), driven by
play/demo_actions.jsonl, and saves the window (the display surface, HUD included) after N frames:
docs/play.png (the dream) and docs/play_side_by_side.png (Tab: the real game beside the dream).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = Path(__file__).resolve().with_name("demo_actions.jsonl")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m worldmodel.play.screenshot", description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint")
    g.add_argument("--preset")
    p.add_argument("--out", default=str(ROOT / "docs"), help="folder for play.png and play_side_by_side.png")
    p.add_argument("--frames", type=int, default=60, help="frames played before the screenshot")
    p.add_argument("--scale", type=int, default=5, help="scale of the dream view (side by side: one less)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)

    if not os.environ.get("DISPLAY") and os.environ.get("SDL_VIDEODRIVER") != "x11":
        xvfb = shutil.which("xvfb-run")
        if xvfb is None:
            print("play.screenshot: no X display and no xvfb-run (apt-get install xvfb)", file=sys.stderr)
            return 2
        cmd = [xvfb, "-a", "-s", "-screen 0 1280x800x24", sys.executable, "-m", "worldmodel.play.screenshot",
               *(argv if argv is not None else sys.argv[1:])]
        return subprocess.call(cmd, env={**os.environ, "SDL_VIDEODRIVER": "x11"})

    source = []
    if args.checkpoint:
        source = ["--checkpoint", args.checkpoint]
    elif args.preset:
        source = ["--preset", args.preset]
    else:
        from worldmodel.inference.loading import find_default_checkpoint

        found = find_default_checkpoint()
        source = ["--checkpoint", str(found)] if found else ["--preset", "tiny"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SDL_VIDEODRIVER": "x11"}
    runs = [("play.png", ["--scale", str(args.scale)]),
            ("play_side_by_side.png", ["--scale", str(max(1, args.scale - 1)), "--side-by-side"])]
    for name, extra in runs:
        cmd = [sys.executable, "-m", "worldmodel", "play", *source, "--device", args.device, "--autoplay", str(DEMO),
               "--max-frames", str(args.frames + 1), "--screenshot-at", str(args.frames), str(out / name),
               "--no-grab", *extra]
        print("+", " ".join(cmd), flush=True)
        rc = subprocess.call(cmd, env=env, cwd=ROOT)
        if rc != 0:
            return rc
        print(f"saved {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
