"""Start scenes from the real game: the one place where Doom is played up to the moment a world model
takes over. A scene is the game reset with a seed (and, at a level's start place, the player warped
there), then a warm-up of N tics played by a policy; its last frames and the actions that produced them
are the context that seeds a `WorldModel` (`wm.reset(*scene.context(n))`), and the env is left where
the context ends, so that the real game can go on beside the model.

    env = DoomEnv(wad="freedoom2", map="MAP01", seed=seed, depth=True)
    scene = start_scene(env, seed, warmup=140, act=explorer(ExplorerPolicy(seed)))
    wm.reset(*scene.context(8))

The callers differ only in their numbers and their policy (the loop is this one):
- `worldmodel eval` (`worldmodel.evaluation.rollouts.Episode`): the explorer policy, seeing depth and
  position, for 35..--warmup tics plus the context, from the map's player start or a level's evaluation
  start place; replayed to the context for every probe (`Scene.replay`);
- `worldmodel record`: standing still for the context;
- `DreamEnv` (start="game"): the explorer policy, blind, for the context;
- `worldmodel play` (`worldmodel.play.sources.RealStarts`): standing still the first time, then a short
  random walk (`warmup_actions`); a level exit during the walk cuts to the restarted map (`on_exit="cut"`).
The same (env settings, seed, warm-up, policy) give the same frames: the game and the policies are seeded.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from worldmodel.game.action import NOOP, TURN_MAX, Action

# a warm-up policy: the action for the next tic, given the game (a DoomEnv: its position, depth buffer)
Act = Callable[[object], Action]


def standing_still(env) -> Action:
    return NOOP


def explorer(policy, sees: bool = True) -> Act:
    """The explorer policy (`worldmodel.game.policy.ExplorerPolicy`) as a warm-up: seeing the game's
    position and depth buffer (the env needs `depth=True`), or blind."""
    if sees:
        return lambda env: policy.act(env.position, env.depth)
    return lambda env: policy.act()


def scripted(actions: Sequence[Action]) -> Act:
    """The given actions, one a tic."""
    it = iter(actions)
    return lambda env: next(it)


def warmup_actions(n: int, rng: random.Random | None) -> list[Action]:
    """n warm-up actions: standing still (rng None, the first start) or a short random walk."""
    if rng is None:
        return [NOOP] * n
    out: list[Action] = []
    while len(out) < n:
        turn = rng.choice((-1, 1)) * rng.uniform(3.0, TURN_MAX * 0.6)
        out += [Action(turn=round(turn, 3))] * rng.randint(2, 12)
        out += [Action(move=1, strafe=rng.choice((-1, 0, 0, 1)))] * rng.randint(4, 20)
    return out[:n]


@dataclass
class Scene:
    """A start scene: every frame since the (last) reset, the actions that produced them (the no-op for
    the reset's frame), and the env, left in the state of frames[-1]."""

    env: object  # worldmodel.game.doom.DoomEnv
    seed: int
    start: tuple | None  # (x, y, heading) warped to after the reset, or None (the map's player start)
    frames: list[np.ndarray]
    actions: list[Action]
    path: list[Action] | None  # every action since the reset (and the warp); None after a cut (on_exit="cut")
    start_position: tuple  # (x, y, angle) where the scene began

    def context(self, n: int | None = None) -> tuple[np.ndarray, list[Action]]:
        """The last n frames (uint8 (n, H, W, 3)) and their actions (all of them: None)."""
        n = n or len(self.frames)
        return np.stack(self.frames[-n:]), self.actions[-n:]

    def begin(self) -> np.ndarray:
        """Reset the game with the scene's seed (and warp to its start); returns the first frame."""
        f = self.env.reset(seed=self.seed)
        if self.start is not None:
            f = self.env.warp(*self.start)
        self.start_position = self.env.position
        return f

    def replay(self) -> np.ndarray:
        """Put the game back where the warm-up ended (the game is deterministic); returns that frame."""
        if self.path is None:
            raise RuntimeError("a scene cut by a level exit cannot be replayed")
        f = self.begin()
        for a in self.path:
            f = self.env.step(a)
        return f


def start_scene(env, seed: int, warmup: int, act: Act = standing_still, start: tuple | None = None,
                on_exit: str = "reset") -> Scene:
    """Reset `env` with `seed` (then warp to `start`, (x, y, heading), if given) and play `warmup` tics
    with `act`. Leaving the level during the warm-up starts the scene over: from the reset again
    (on_exit="reset": the scene stays replayable), or from the restarted map's first frame ("cut"); the
    tics go on counting either way."""
    if on_exit not in ("reset", "cut"):
        raise ValueError(f"on_exit must be 'reset' or 'cut', got {on_exit!r}")
    scene = Scene(env, seed, start, frames=[], actions=[NOOP], path=[], start_position=())
    scene.frames.append(scene.begin())
    for _ in range(warmup):
        a = act(env)
        f = env.step(a)
        if env.restarted:  # left the level: start over
            if on_exit == "reset":
                scene.frames, scene.actions, scene.path = [scene.begin()], [NOOP], []
            else:
                scene.frames, scene.actions, scene.path = [f], [NOOP], None
                scene.start_position = env.position
            continue
        scene.frames.append(f)
        scene.actions.append(a)
        if scene.path is not None:
            scene.path.append(a)
    return scene
