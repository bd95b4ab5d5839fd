"""The player's action for one frame (one game tic, 1/35 s), its tensor encoding and JSON Lines scripts."""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

TURN_MAX = 15.0  # degrees of yaw per frame, either way
TURN_DECIMALS = 3  # turn is kept to 1/1000 degree so that the float32 encoding round-trips exactly
ACTION_DIM = 5  # length of the encoding: move, strafe, turn / TURN_MAX, attack, use
FIELDS = ("move", "strafe", "turn", "attack", "use")
MAX_SCRIPT_FRAMES = 24 * 3600 * 35  # a day of play at 35 tics a second: a longer script (or repeat) is refused
MAX_LINE_BYTES = 1 << 16  # an action line is a few dozen bytes: a longer one is not an action script


@dataclass(frozen=True)
class Action:
    """move: -1 back, 0, +1 forward; strafe: -1 left, 0, +1 right; turn: degrees this frame, positive
    turns right, within +-TURN_MAX; attack, use: buttons held this frame."""

    move: int = 0
    strafe: int = 0
    turn: float = 0.0
    attack: bool = False
    use: bool = False

    def __post_init__(self):
        for name in ("move", "strafe"):  # numbers.Real: Python and numpy numbers alike
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or v not in (-1, 0, 1):
                raise ValueError(f"Action.{name} must be -1, 0 or 1, got {v!r}")
            object.__setattr__(self, name, int(v))
        t = self.turn
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t):
            raise ValueError(f"Action.turn must be a finite number of degrees, got {t!r}")
        if abs(t) > TURN_MAX:
            raise ValueError(f"Action.turn must be within +-{TURN_MAX:g} degrees, got {t!r}")
        object.__setattr__(self, "turn", round(float(t), TURN_DECIMALS) + 0.0)  # + 0.0 folds -0.0
        for name in ("attack", "use"):
            v = getattr(self, name)
            if v not in (True, False, 0, 1):
                raise ValueError(f"Action.{name} must be a bool, got {v!r}")
            object.__setattr__(self, name, bool(v))

    # -- encoding for the model: float32 vector of length ACTION_DIM --------------------------------
    def to_vector(self) -> list[float]:
        return [float(self.move), float(self.strafe), self.turn / TURN_MAX, float(self.attack), float(self.use)]

    @classmethod
    def from_vector(cls, vec) -> "Action":
        m, s, t, a, u = (float(x) for x in vec)
        return cls(move=int(round(m)), strafe=int(round(s)),
                   turn=max(-TURN_MAX, min(TURN_MAX, round(t * TURN_MAX, TURN_DECIMALS))),
                   attack=a > 0.5, use=u > 0.5)

    def to_tensor(self) -> torch.Tensor:
        return torch.tensor(self.to_vector(), dtype=torch.float32)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "Action":
        return cls.from_vector(t.detach().float().cpu().tolist())

    # -- dict / JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Action":
        if not isinstance(d, dict):
            raise ValueError(f"an action must be a JSON object, got {type(d).__name__}")
        unknown = set(d) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown action field(s) {sorted(unknown)}; expected {list(FIELDS)}")
        return cls(**d)


NOOP = Action()


def encode_actions(actions: Iterable[Action]) -> torch.Tensor:
    """list of Action -> float32 tensor (N, ACTION_DIM)."""
    rows = [a.to_vector() for a in actions]
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), ACTION_DIM)


def decode_actions(t: torch.Tensor) -> list[Action]:
    """float tensor (N, ACTION_DIM) -> list of Action."""
    return [Action.from_vector(row) for row in t.detach().float().cpu().tolist()]


class ActionScriptError(ValueError):
    """A malformed action script; the message names the file and line."""


def _script_runs(lines: Iterable[str | bytes], source: str) -> Iterator[tuple[Action, int]]:
    """(action, repeat) for each action line of a JSON Lines script, checked as it is read: one action
    object per line with an optional "repeat": n; blank lines and lines starting with '#' are skipped. A
    bad line, or a script longer than MAX_SCRIPT_FRAMES frames, is an ActionScriptError naming the line."""
    total = 0
    for lineno, line in enumerate(lines, 1):
        where = f"{source}: line {lineno}"
        if isinstance(line, bytes):
            if len(line) > MAX_LINE_BYTES:
                raise ActionScriptError(f"{where}: longer than {MAX_LINE_BYTES} bytes (not an action script?)")
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError:
                raise ActionScriptError(f"{where}: not UTF-8 text (a binary file, not an action script?)") from None
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            obj = dict(obj)
            repeat = obj.pop("repeat", 1)
            if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
                raise ValueError(f"repeat must be a positive integer, got {repeat!r}")
            if repeat > MAX_SCRIPT_FRAMES - total:
                raise ValueError(f"repeat {repeat} takes the script past {MAX_SCRIPT_FRAMES} frames (24 hours "
                                 f"at 35 frames/s), the most a script may hold")
            action = Action.from_dict(obj)
        except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
            raise ActionScriptError(f"{where}: {e}") from None
        total += repeat
        yield action, repeat


def parse_action_lines(lines: Iterable[str], source: str = "<actions>") -> list[Action]:
    """The actions of JSON Lines script lines, repeats expanded (see `_script_runs`)."""
    return [a for a, n in _script_runs(lines, source) for _ in range(n)]


class ActionScript:
    """A JSON Lines action script file read as a stream: checked line by line when made (a bad line fails
    with its number before any work starts), then read again by each iteration, which yields one Action
    per frame with `repeat` honoured lazily, so memory stays flat whatever the counts. len(): frames."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.frames = sum(n for _, n in self._runs())
        if not self.frames:
            raise ActionScriptError(f"{self.path}: the action script holds no action")

    def _runs(self) -> Iterator[tuple[Action, int]]:
        try:
            with open(self.path, "rb") as f:
                # readline with a limit: a file without line breaks is never read whole
                yield from _script_runs(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), str(self.path))
        except OSError as e:
            raise ActionScriptError(f"{self.path}: cannot read action script: {e.strerror}") from None

    def __len__(self) -> int:
        return self.frames

    def __iter__(self) -> Iterator[Action]:
        for action, n in self._runs():
            for _ in range(n):
                yield action


def load_actions(path: str | Path) -> list[Action]:
    """All actions of a script file as a list (at most MAX_SCRIPT_FRAMES); `ActionScript` streams them."""
    return list(ActionScript(path))


def dump_action_lines(actions: Iterable[Action]) -> list[str]:
    """Run-length encoded JSON Lines (consecutive equal actions become one line with "repeat")."""
    lines: list[str] = []
    prev, count = None, 0
    for a in list(actions) + [None]:
        if a == prev:
            count += 1
            continue
        if prev is not None:
            d = prev.to_dict()
            if count > 1:
                d["repeat"] = count
            lines.append(json.dumps(d))
        prev, count = a, 1
    return lines


def save_actions(path: str | Path, actions: Iterable[Action]) -> None:
    Path(path).write_text("".join(line + "\n" for line in dump_action_lines(actions)))
