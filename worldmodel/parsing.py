"""Parsing the command line's small value formats, each in one place: a one-line UserError for
anything else."""
from __future__ import annotations

from worldmodel.errors import UserError


def parse_int_list(spec: str, name: str) -> list[int]:
    """'1,8,35' -> [1, 8, 35] (for the flag --`name`)."""
    try:
        out = [int(x) for x in str(spec).split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--{name}: expected comma-separated integers, got {spec!r}") from None
    if not out:
        raise UserError(f"--{name}: no value given")
    return out


def parse_hw(spec: str, example: str = "96x128") -> tuple[int, int]:
    """'96x128' (height x width; '*' also separates) -> (96, 128)."""
    try:
        h, w = (int(v) for v in str(spec).lower().replace("*", "x").split("x"))
    except ValueError:
        raise UserError(f"bad size {spec!r}; expected HxW, e.g. {example}") from None
    return h, w
