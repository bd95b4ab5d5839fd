"""The action trace `worldmodel bench` feeds the engine: human-like (the explorer policy playing the real
game), shipped in benchmarks/traces/ or recorded now; and how repetitive a trace is (what speculative
sampling can draft)."""
from __future__ import annotations

import itertools
from pathlib import Path

from worldmodel.game.action import Action, ActionScript

TRACE_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "traces"  # in the repository, beside worldmodel/
DEFAULT_TRACE = "explorer_MAP01_seed0.jsonl"


def game_trace(n: int, map_name: str = "MAP01", seed: int = 0, wad: str = "freedoom2") -> list[Action]:
    """n actions of the explorer policy playing the real game (it sees depth and position): human-like."""
    from worldmodel.game.doom import DoomEnv
    from worldmodel.game.policy import ExplorerPolicy

    policy = ExplorerPolicy(seed)
    out = []
    with DoomEnv(wad=wad, map=map_name, seed=seed, depth=True) as env:
        env.reset()
        for _ in range(n):
            a = policy.act(env.position, env.depth)
            env.step(a)
            out.append(a)
    return out


def load_trace(spec: str | None, n: int, seed: int = 0) -> tuple[list[Action], str]:
    """(actions, description). spec: a JSON Lines file, 'game' (record now), 'blind' (explorer without
    eyes), or None (the shipped trace, else 'game')."""
    if spec is None:
        shipped = TRACE_DIR / DEFAULT_TRACE
        if shipped.exists():
            spec = str(shipped)
        else:
            spec = "game"
    if spec == "game":
        return game_trace(n, seed=seed), f"explorer policy playing freedoom2 MAP01, seed {seed} (recorded now)"
    if spec == "blind":
        from worldmodel.game.policy import explorer_actions

        return explorer_actions(n, seed), f"explorer policy without eyes, seed {seed}"
    actions = list(itertools.islice(ActionScript(spec), n))  # a script longer than the run is read no further
    try:
        shown = str(Path(spec).resolve().relative_to(Path.cwd()))
    except ValueError:
        shown = str(spec)
    return actions, shown


def trace_summary(actions: list[Action], tolerance: float | None = None) -> dict:
    """How repetitive a trace is: exact repeats, runs, turning; with `tolerance` (the engine's
    speculative_tolerance, degrees) the fraction of next actions a draft could stand for (an upper bound
    on the speculative acceptance rate)."""
    pairs = list(zip(actions, actions[1:]))
    same = sum(1 for a, b in pairs if a == b)
    runs = 1 + sum(1 for a, b in pairs if a != b) if actions else 0
    out = {"frames": len(actions), "repeat_fraction": same / max(1, len(pairs)),
           "mean_run_length": len(actions) / max(1, runs),
           "turning_fraction": sum(1 for a in actions if a.turn != 0) / max(1, len(actions))}
    if tolerance is not None:
        from worldmodel.inference.engine import speculative_match

        out["speculative_tolerance"] = tolerance
        out["draftable_fraction"] = sum(1 for a, b in pairs if speculative_match(a, b, tolerance)) / max(1, len(pairs))
    return out
