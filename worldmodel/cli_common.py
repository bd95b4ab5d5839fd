"""Pieces shared by the commands that run a model (`record`, `bench`, `eval`, `play`): the
model-choosing flags and loading, the shipped default checkpoint, integer lists, and the provenance
written into their results; and `check_output_path`, which every command runs on its outputs before
its work starts. Heavy imports (torch, the engine) happen on use, not at import: every command module
is imported to build the command line."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from worldmodel.errors import UserError

DEFAULT_CHECKPOINT = "checkpoints/doom-tiny"  # checkpoints/doom-map01, the level model, loses to it beyond 8 frames (its model card)
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


def load_model(args, alternatives: str = RANDOM_WEIGHTS_HINT, **settings):
    """The WorldModel the flags name (--checkpoint / --preset / --device), with its settings (None values
    are left at the model's defaults). `alternatives`: what the missing-default-checkpoint error suggests."""
    from worldmodel.engine import WorldModel
    from worldmodel.model import PRESETS

    settings = {k: v for k, v in settings.items() if v is not None}
    if args.preset:
        if args.preset not in PRESETS:
            raise UserError(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
        return WorldModel.from_preset(args.preset, device=args.device, **settings)
    return WorldModel.from_pretrained(args.checkpoint or default_checkpoint(alternatives), device=args.device,
                                      **settings)


def model_name(args, wm) -> str:
    """A short name for outputs: the preset's, else the checkpoint folder's."""
    return args.preset or Path(wm.folder).name


def parse_int_list(spec: str, name: str) -> list[int]:
    try:
        out = [int(x) for x in str(spec).split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--{name}: expected comma-separated integers, got {spec!r}") from None
    if not out:
        raise UserError(f"--{name}: no value given")
    return out


def command_line() -> str:
    """This run's command line, quoted for a shell."""
    import shlex

    return "worldmodel " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def provenance() -> dict:
    """What a result file says about how it was made: command, time, commit, torch and Python versions."""
    import datetime as _dt
    import platform

    import torch

    from worldmodel.recording import git_commit

    return {"command": command_line(), "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "commit": git_commit(), "torch": torch.__version__, "python": platform.python_version()}


def check_output_path(path: str | os.PathLike, what: str = "--out", folder: bool = False) -> Path:
    """`path`, if it can be written (a folder if `folder`, else a file), else a one-line UserError naming
    `what` and the path: run before the work, so that no result is lost at its end. Refused: a folder
    where a file goes or a file where a folder goes, a path under a file, and a place this process cannot
    write in (tried with a temporary file, which is removed: permissions, a read-only file system).
    Nothing is created."""
    p = Path(path)
    if folder and p.exists() and not p.is_dir():
        raise UserError(f"{what} {p}: is a file, not a folder")
    if not folder and p.is_dir():
        raise UserError(f"{what} {p}: is a folder; give a file name")
    base = p if folder else p.parent  # the nearest folder that exists: where the first write happens
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise UserError(f"{what} {p}: {base} is a file, so nothing can be written under it")
    try:
        fd, tmp = tempfile.mkstemp(dir=base, prefix=".worldmodel-write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(f"{what} {p}: cannot write in {base} ({e.strerror})") from None
    if not folder and p.exists() and not os.access(p, os.W_OK):
        raise UserError(f"{what} {p}: the file is read-only")
    return p
