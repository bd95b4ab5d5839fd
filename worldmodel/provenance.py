"""What every result file says about how it was made: the command line, the time, the source commit,
torch and Python versions."""
from __future__ import annotations

import datetime as _dt
import platform
import shlex
import subprocess
import sys
from pathlib import Path


def now() -> str:
    """The local time with its offset, to the second (ISO 8601)."""
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def command_line() -> str:
    """This run's command line, quoted for a shell."""
    return "worldmodel " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def git_commit(short: bool = False) -> str | None:
    """The commit of the source tree this package runs from, "-dirty" if tracked files changed (None
    outside a git checkout)."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"],
                             cwd=root, capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return None
        sha = out.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return sha + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict:
    import torch

    return {"command": command_line(), "created": now(), "commit": git_commit(), "torch": torch.__version__,
            "python": platform.python_version()}
