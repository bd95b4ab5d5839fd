"""Choosing and loading the model a command runs (`record`, `bench`, `eval`, `play`): the model flags,
the shipped default checkpoint (the engine's flags are worldmodel/inference/settings.py's). Heavy imports (torch, the engine) happen on use, not at import: every
command module is imported to build the command line."""
from __future__ import annotations

import argparse
from pathlib import Path

from worldmodel.errors import UserError

DEFAULT_CHECKPOINT = "checkpoints/doom-map01-guided"  # MAP01: follows the controls far better than doom-tiny, 0.14 dB below it (its model card)
RANDOM_WEIGHTS_HINT = "--preset tiny|small|nfd-310m for random weights"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", metavar="C",
                   help=f"checkpoint folder or Hub id (default: the shipped {DEFAULT_CHECKPOINT})")
    g.add_argument("--preset", metavar="P", help="random weights in a preset's shape: tiny, small or nfd-310m")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, mps")


def find_default_checkpoint() -> Path | None:
    """DEFAULT_CHECKPOINT in the working directory, else beside the package (an editable install);
    None when neither holds a checkpoint."""
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        p = base / DEFAULT_CHECKPOINT
        if (p / "config.json").exists():
            return p
    return None


def default_checkpoint(alternatives: str = RANDOM_WEIGHTS_HINT) -> Path:
    """The shipped checkpoint, or a UserError saying what to pass instead (`alternatives`)."""
    found = find_default_checkpoint()
    if found is None:
        raise UserError(f"the shipped checkpoint {DEFAULT_CHECKPOINT} is missing (no trained model here yet): "
                        f"pass --checkpoint DIR, or {alternatives}")
    return found


def load_model(args, alternatives: str = RANDOM_WEIGHTS_HINT, settings=None, **changes):
    """The WorldModel the flags name (--checkpoint / --preset / --device), with its EngineSettings
    (`settings`, from `settings_from_args`, and/or keyword changes; worldmodel/inference/settings.py).
    `alternatives`: what the missing-default-checkpoint error suggests."""
    from worldmodel.inference.engine import WorldModel
    from worldmodel.model.transformer import PRESETS

    if args.preset:
        if args.preset not in PRESETS:
            raise UserError(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
        return WorldModel.from_preset(args.preset, device=args.device, settings=settings, **changes)
    return WorldModel.from_pretrained(args.checkpoint or default_checkpoint(alternatives), device=args.device,
                                      settings=settings, **changes)


def model_name(args, wm) -> str:
    """A short name for outputs: the preset's, else the checkpoint folder's."""
    return args.preset or Path(wm.folder).name

