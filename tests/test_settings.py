"""The engine's settings (worldmodel/inference/settings.py): one EngineSettings, one set of flags for
play, record, eval and bench, checked in one place; the lists bench sweeps and a recording names."""
from __future__ import annotations

import argparse

import pytest

from worldmodel.cli import build_parser, main
from worldmodel.errors import UserError
from worldmodel.inference.settings import (RECORDED, SETTINGS, SWEPT, EngineSettings, add_engine_arguments,
                                           settings_from_args, sweep_from_args)


def sub(name: str) -> argparse.ArgumentParser:
    return build_parser()._subparsers._group_actions[0].choices[name]


def test_each_command_keeps_its_flags_and_defaults():
    defaults = {name: {a.dest: a.default for a in sub(name)._actions if a.dest in SETTINGS}
                for name in ("play", "record", "eval", "bench")}
    assert defaults["play"] == {"steps": None, "context_noise": None, "speculative": None, "attention": None,
                                "threads": "auto", "pipeline": "auto", "seed": 0}
    assert defaults["record"] == {"seed": "0", "steps": None, "context_noise": None, "speculative": 1,
                                  "attention": None}
    assert defaults["eval"] == {"seed": 0, "steps": None, "context_noise": None, "speculative": 1, "attention": None}
    assert defaults["bench"] == {**{k: None for k in SWEPT}, "seed": 0}  # bench's --seed: its trace's
    assert SWEPT == ("steps", "speculative", "attention", "compile", "threads", "pipeline")
    assert RECORDED == ("steps", "context_noise", "speculative", "speculative_tolerance", "attention", "seed",
                        "compile")


def test_flags_parse_to_checked_settings():
    p = argparse.ArgumentParser()
    add_engine_arguments(p, ("steps", "speculative", "pipeline", "seed"), lists=("seed",), defaults={"seed": "0"})
    args = p.parse_args(["--steps", "3", "--pipeline", "off", "--seed", "1,2"])
    assert args.seed == [1, 2] and p.parse_args([]).seed == [0]
    s = settings_from_args(args)  # a list flag is not a setting of one engine
    assert (s.steps, s.pipeline, s.seed, s.speculative) == (3, False, 0, 1)
    b = argparse.ArgumentParser()
    add_engine_arguments(b, SWEPT, lists=SWEPT)
    assert sweep_from_args(b.parse_args(["--compile", "on,inductor", "--steps", "1,2"])) == [
        ("steps", 1), ("steps", 2), ("compile", True), ("compile", "inductor")]


@pytest.mark.parametrize("argv, flag", [(["--steps", "0"], "--steps"), (["--speculative", "0"], "--speculative"),
                                        (["--threads", "0"], "--threads"), (["--pipeline", "yes"], "--pipeline"),
                                        (["--attention", "nope"], "--attention"),
                                        (["--context-noise", "1"], "--context-noise"),
                                        (["--context-noise", "-0.1"], "--context-noise")])
def test_a_bad_value_is_one_line_naming_its_flag(argv, flag):
    with pytest.raises(UserError, match=f"^{flag}: "):
        settings_from_args(sub("play").parse_args(argv))


def test_a_bad_sweep_names_its_flag(tmp_path, capsys):
    assert main(["bench", "--preset", "tiny", "--steps", "1,0", "--out", str(tmp_path / "b.json")]) == 2
    assert "--steps: steps must be a positive integer" in capsys.readouterr().err


def test_settings_are_frozen_and_checked():
    s = EngineSettings(steps=2, compile="off", threads="auto")
    assert (s.steps, s.compile, s.threads) == (2, False, "auto")
    with pytest.raises(AttributeError):
        s.steps = 3
    for bad in ({"steps": 0}, {"speculative": True}, {"speculative_tolerance": float("nan")}, {"seed": 1.5},
                {"compile": "fast"}, {"dtype": "int8"}, {"context_noise": float("nan")}, {"context_noise": 1}):
        with pytest.raises(ValueError):
            EngineSettings(**bad)
    with pytest.raises(TypeError):
        EngineSettings(sample_steps=2)
