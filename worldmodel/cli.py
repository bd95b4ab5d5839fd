"""The `worldmodel` console script. Each subcommand lives in its own module, which provides
`add_arguments(parser)` and `run(args) -> int`; this file only wires them together."""
from __future__ import annotations

import argparse
import importlib
import sys

from worldmodel.errors import UserError, sigterm_unwinds

# name -> (module, one-line help). `data verify` and `train autoencoder|model` have sub-subcommands.
COMMANDS = {
    "collect": ("worldmodel.data.collect", "record gameplay from the training maps into a dataset"),
    "data": ("worldmodel.data.tools", "dataset tools (`data verify DIR`)"),
    "train": ("worldmodel.training.train_cli", "train the autoencoder or the diffusion transformer"),
    "distill": ("worldmodel.training.distill_cli", "distil a trained model to 1-4 sampling steps"),
    "play": ("worldmodel.play.command", "play inside the dream in a window"),
    "record": ("worldmodel.evaluation.record", "record rollouts headless from an action script or a policy"),
    "bench": ("worldmodel.evaluation.bench", "benchmark the engine's frames/s and latency"),
    "eval": ("worldmodel.evaluation.evaluate", "compare generated frames against the real game"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worldmodel",
        description="A neural game engine: play, record and benchmark a Doom level generated frame by frame "
                    "by an action-conditioned diffusion transformer.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is None or not module.startswith(e.name):
                raise
            p.set_defaults(_missing=module)
            continue
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    with sigterm_unwinds():  # `kill PID` cleans up like Ctrl-C
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_missing", None):
        print(f"worldmodel {args.command}: not available in this build ({args._missing} is missing)", file=sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"\nworldmodel {args.command}: interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, OSError) as e:
        print(f"worldmodel {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
