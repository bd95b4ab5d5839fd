"""The engine's settings, in one place: `EngineSettings` (what they are, their defaults, their checks),
the command-line flags that set them (`add_engine_arguments`, shared by play, record, eval and bench)
and the settings those flags give (`settings_from_args`, `sweep_from_args`).

A setting is checked here when it is made (a frozen EngineSettings cannot hold a bad value); what
depends on the model or the device (speculative <= the model's max_draft, a backend this device can
run, CUDA graphs only on CUDA) is checked by the engine when it takes them (`WorldModel.configure`,
worldmodel/inference/engine.py). The engine's default number of denoising steps and context noise
level are the checkpoint's (`steps=None`, `context_noise=None`: its SamplingDefaults, config.json's
"sampling"). No heavy imports: every command module imports this to build the command line.
"""
from __future__ import annotations

import argparse
import math
import numbers
from dataclasses import dataclass, field, fields

import numpy as np

from worldmodel.errors import UserError

# `compile` modes: "off" (eager); "on" (inductor, with CUDA graphs on CUDA: torch.compile mode
# "reduce-overhead"); "inductor" (inductor, no CUDA graphs); "graphs" (CUDA graphs of the traced passes,
# no inductor code generation: dynamo's "cudagraphs" backend; CUDA only)
COMPILE_MODES = ("off", "on", "inductor", "graphs")
DEFAULT_TOLERANCE = 0.5  # degrees of turn: < 1 pixel of yaw at the tiny tier's 128 px width (~90 deg FOV)
AUTO = "auto"


# -- checks: value -> the value as stored, or ValueError saying what is allowed ---------------------------
def _integer(name: str, n, low: int | None = None, what: str = "an integer") -> int:
    if isinstance(n, bool) or not isinstance(n, (numbers.Integral, np.integer)) or (low is not None and n < low):
        raise ValueError(f"{name} must be {what}, got {n!r}")
    return int(n)


def _check_steps(n):
    return None if n is None else _integer("steps", n, 1, "a positive integer")


def _check_context_noise(t):
    if t is None:
        return None
    from worldmodel.model.sampler import check_context_noise  # torch: imported when a setting is made

    return check_context_noise(t)


def _check_speculative(n):
    return _integer("speculative", n, 1, "a positive integer (1 = off)")


def _check_tolerance(deg):
    if isinstance(deg, bool) or not isinstance(deg, numbers.Real) or not math.isfinite(deg) or deg < 0:
        raise ValueError(f"speculative_tolerance must be a finite number of degrees >= 0, got {deg!r}")
    return float(deg)


def _check_attention(name):
    if name in (None, ""):
        return None
    from worldmodel.kernels import BACKENDS  # torch: imported when a setting is made, not to build the parser

    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def _check_seed(s):
    return _integer("seed", s)


def _check_compile(mode):
    if isinstance(mode, str):
        mode = mode.strip().lower()
    elif isinstance(mode, (bool, np.bool_)):
        return bool(mode)
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be True, False or one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    return {"off": False, "on": True}.get(mode, mode)


def _check_threads(n):
    return AUTO if n in (None, AUTO) else _integer("threads", n, 1, "a positive integer or 'auto'")


def _check_pipeline(on):
    if on in (None, AUTO):
        return AUTO
    if isinstance(on, str) and on.strip().lower() in ("on", "off"):
        return on.strip().lower() == "on"
    if not isinstance(on, (bool, np.bool_)):
        raise ValueError(f"pipeline must be True, False or 'auto', got {on!r}")
    return bool(on)


def _check_dtype(dtype):
    if dtype in (None, AUTO):
        return AUTO
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype must be 'auto', {', '.join(_DTYPES)}, got {dtype!r}")
    return name


_DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "float64")


def _setting(default, check, help: str, metavar: str | None = None, recorded: bool = False, swept: bool = False):
    """A field of EngineSettings: its default, its check, its flag's help and metavar; `recorded`: a
    recording's metadata names it (worldmodel/data/recording.py: model_meta); `swept`: `worldmodel
    bench` compares its values (worldmodel/evaluation/bench.py)."""
    return field(default=default, metadata={"check": check, "help": help, "metavar": metavar,
                                            "recorded": recorded, "swept": swept})


@dataclass(frozen=True)
class EngineSettings:
    """How the engine samples and runs; none of it is architecture (that is ModelConfig's) and all of it
    can change between frames (`WorldModel.configure`), but `dtype` (construction only)."""
    steps: int | None = _setting(None, _check_steps, "denoising steps a frame (default: the checkpoint's)",
                                 "K", recorded=True, swept=True)
    context_noise: float | None = _setting(None, _check_context_noise, "noise level the frames enter the context at, "
                                           "in [0, 1) (default: the checkpoint's)", "T", recorded=True)
    speculative: int = _setting(1, _check_speculative, "speculative next-frame sampling: frames made per pass while "
                                "an action is held (1 = off)", "N", recorded=True, swept=True)
    speculative_tolerance: float = _setting(DEFAULT_TOLERANCE, _check_tolerance,
                                            "degrees of turn a draft may be off and still be served", "DEG",
                                            recorded=True)
    attention: str | None = _setting(None, _check_attention, "attention backend: torch, sdpa, matmul, flex or triton "
                                     "(default: the best for the device)", "B", recorded=True, swept=True)
    seed: int = _setting(0, _check_seed, "seed of the sampling noise", "S", recorded=True)
    compile: bool | str = _setting(False, _check_compile, "torch.compile the per-frame passes: off, on (inductor + "
                                   "CUDA graphs on CUDA), inductor (no CUDA graphs), graphs (CUDA graphs without "
                                   "inductor; CUDA only)", "MODE", recorded=True, swept=True)
    threads: int | str = _setting(AUTO, _check_threads, "CPU: torch intra-op threads, process-wide (auto: half the "
                                  "cores, at least 1)", "N", swept=True)
    pipeline: bool | str = _setting(AUTO, _check_pipeline, "decode frame t on a second thread while frame t+1 is "
                                    "generated: on, off or auto (on a CPU with 2+ cores)", "on|off", swept=True)
    dtype: str = _setting(AUTO, _check_dtype, "precision: auto (bfloat16 on CUDA and on CPUs with native bf16, "
                          "else float32), float32, bfloat16, ...", "DTYPE")

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, f.metadata["check"](getattr(self, f.name)))


SETTINGS = tuple(f.name for f in fields(EngineSettings))
RECORDED = tuple(f.name for f in fields(EngineSettings) if f.metadata["recorded"])  # in a recording's metadata
SWEPT = tuple(f.name for f in fields(EngineSettings) if f.metadata["swept"])  # what `worldmodel bench` compares
_FIELDS = {f.name: f for f in fields(EngineSettings)}


# -- the command line ---------------------------------------------------------------------------------------
def _flag_type(name: str, as_list: bool):
    """argparse type of --NAME: the text as the setting's type (a number where it is one; one value, or a
    comma-separated list). The settings' checks come after parsing (`settings_from_args`,
    `sweep_from_args`), so that a bad value is the command's one-line error (exit code 2)."""
    number = {"steps": int, "speculative": int, "seed": int, "threads": int, "speculative_tolerance": float,
              "context_noise": float}.get(name)

    def parse_one(text: str):
        text = text.strip()
        if number is None or text == AUTO:
            return text
        try:
            return number(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if number is int else 'a number'}, "
                                             f"got {text!r}") from None

    def parse(text: str):
        if not as_list:
            return parse_one(text)
        values = [parse_one(v) for v in str(text).split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError("no value given")
        return values

    parse.__name__ = name
    return parse


def _checked(name: str, value):
    """The setting's check, as a one-line error naming the flag."""
    try:
        return _FIELDS[name].metadata["check"](value)
    except ValueError as e:
        raise UserError(f"--{name.replace('_', '-')}: {e}") from None


def add_engine_arguments(parser, names=SETTINGS, *, lists=(), defaults: dict | None = None,
                         helps: dict | None = None) -> None:
    """Declare --NAME for each setting in `names` on `parser` (a parser or an argument group). Flags in
    `lists` take comma-separated values (`worldmodel bench` compares them; `record --seed 0,1,2` runs
    each) and default to None (none given); the others default to the setting's default, or to
    `defaults[name]` (None: left to the engine, or to the command). `helps[name]` adds to a flag's help.
    Numbers are read as argparse parses; the values are checked by `settings_from_args`/`sweep_from_args`."""
    defaults, helps = dict(defaults or {}), dict(helps or {})
    for name in names:
        meta = _FIELDS[name].metadata
        as_list = name in lists
        metavar = meta["metavar"] + ",.." if as_list else meta["metavar"]
        help_text = meta["help"] + (" (several: comma-separated)" if as_list else "") + helps.get(name, "")
        default = defaults.get(name, None if as_list else _FIELDS[name].default)
        parser.add_argument("--" + name.replace("_", "-"), type=_flag_type(name, as_list), default=default,
                            metavar=metavar, help=help_text)


def settings_from_args(args, leave_out=()) -> EngineSettings:
    """The EngineSettings the command line gives: each setting whose flag was declared with one value and
    is not None (the others at their defaults); the names in `leave_out` too are left at their defaults.
    A bad value: UserError naming its flag."""
    given = {name: _checked(name, getattr(args, name)) for name in SETTINGS
             if name not in leave_out and getattr(args, name, None) is not None
             and not isinstance(getattr(args, name), list)}
    return EngineSettings(**given)


def sweep_from_args(args, names=SWEPT) -> list[tuple[str, object]]:
    """(name, value) for each value of each list flag in `names`, in that order (`worldmodel bench`), each
    checked (UserError naming its flag)."""
    return [(name, _checked(name, v)) for name in names for v in (getattr(args, name, None) or [])]
