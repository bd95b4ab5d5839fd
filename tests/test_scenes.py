"""Start scenes from the real game (worldmodel/game/scenes.py): one loop for play, record, eval and
DreamEnv; a scene for a seed is deterministic, and each caller still gets the frames it got when each had
a warm-up loop of its own (hashes pinned from those loops, before they moved here)."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from worldmodel.game.action import NOOP, Action
from worldmodel.game.scenes import explorer, scripted, standing_still, start_scene, warmup_actions

pytest.importorskip("vizdoom")

# sha256[:16] of each caller's start scene, computed with its own loop before the move (same calls as below)
PINNED = {
    "play": ["ec57c72ed6d5da71", "c4d083a339cc6281", "d616a1bb06076c79"],  # RealStarts: still, walk, walk
    "dream_env": ["57325ac68f1fe38f", "cef9e4461f61629e"],  # reset(seed=0), reset(seed=1)
    "record": "b30cf13f37c4b2be",  # standing still, 4 frames, with the position it ends at
    "eval_map": "40443c6991f47f0c",  # MAP21 from the player start: context, rollout, probe, replay, digest
    "eval_level": "c0c3be54c9e5b16d",  # MAP01's first held-out episode: warped to an evaluation start place
}


def digest(frames, actions, *extra) -> str:
    h = hashlib.sha256(np.ascontiguousarray(np.stack(frames)).tobytes())
    h.update(json.dumps([a.to_vector() for a in actions]).encode())
    for e in extra:
        h.update(json.dumps(e).encode())
    return h.hexdigest()[:16]


def game(seed=0, depth=False, map="MAP01"):
    from worldmodel.game.doom import DoomEnv

    return DoomEnv(wad="freedoom2", map=map, seed=seed, frame_size=(96, 128), depth=depth)


def test_a_scene_for_a_seed_is_deterministic_and_replays():
    from worldmodel.game.policy import ExplorerPolicy

    scenes = []
    for seed in (3, 3, 4):
        with game(seed, depth=True) as env:
            s = start_scene(env, seed, 40, explorer(ExplorerPolicy(seed)))
            frames, actions = s.context(6)
            assert frames.shape == (6, 96, 128, 3) and len(actions) == 6 and len(s.frames) == 41
            assert s.actions[0] == NOOP and s.path == s.actions[1:]
            assert np.array_equal(s.replay(), s.frames[-1])  # the game goes back to where the warm-up ended
            scenes.append(digest(s.frames, s.actions, list(s.start_position)))
    assert scenes[0] == scenes[1] != scenes[2]


def test_each_caller_still_gets_its_start_scene():
    from worldmodel.play.sources import RealStarts

    rs = RealStarts("MAP01", seed=3, context=4)
    try:
        assert [digest(s.frames, s.actions) for s in (rs.next(), rs.next(), rs.next())] == PINNED["play"]
    finally:
        rs.close()
    with game(0) as env:  # worldmodel record: the game standing still for the context
        f, a = start_scene(env, 0, 4 - 1).context()
        assert digest(f, a, [float(x) for x in env.position]) == PINNED["record"]


def test_dream_env_still_gets_its_start_scene():
    from test_dream_env import small_model
    from worldmodel.inference.dream_env import DreamEnv

    wm = small_model()
    seen, reset = [], wm.reset
    wm.reset = lambda f, a: (seen.append(digest(f, a)), reset(f, a))
    env = DreamEnv(wm, start="game", map="MAP01", context=5)
    try:
        for s in (0, 1):
            env.reset(seed=s)
    finally:
        env.close()
    assert seen == PINNED["dream_env"]


def test_eval_episodes_still_get_their_start_scenes():
    from worldmodel.evaluation.evaluate import level_episodes
    from worldmodel.evaluation.rollouts import Episode
    from worldmodel.game.level import load_level

    level = level_episodes(load_level("freedoom2", "MAP01"), 1, 0)[0]
    for key, spec in (("eval_map", dict(map="MAP21", seed=0, policy_seed=0, start=None)), ("eval_level", level)):
        st = spec["start"]
        ep = Episode("freedoom2", spec["map"], spec["seed"], (96, 128), 4, 40, spec["policy_seed"],
                     start=None if st is None else (st["x"], st["y"], st["heading"]))
        try:
            f, a = ep.context()
            r = ep.rollout(5)
            pr = ep.probe("forward", 3)  # replays the warm-up first
            got = digest(list(f) + r["frames"] + pr["frames"], a + ep.scene.path + r["actions"],
                         [float(x) for x in ep.position], [float(x) for x in ep.start_position],
                         len(ep.real_stats), ep.digest())
        finally:
            ep.close()
        assert got == PINNED[key], key


class ExitingEnv:
    """A stand-in game whose level is left on tic 3 after each reset: frames are numbered by tic."""

    def __init__(self):
        self.resets, self.t, self.restarted, self.position = 0, 0, False, (0.0, 0.0, 0.0)

    def frame(self, value):
        return np.full((2, 2, 3), value, np.uint8)

    def reset(self, seed=None):
        self.resets += 1
        self.t = 0
        return self.frame(100)

    def warp(self, x, y, heading):
        self.position = (x, y, heading)
        return self.frame(101)

    def step(self, action):
        self.t += 1
        self.restarted = self.t == 3 and self.resets == 1
        return self.frame(200 if self.restarted else self.t)


def test_a_level_exit_starts_the_scene_over_from_the_reset_or_from_the_cut():
    walk = [Action(move=1)] * 6
    s = start_scene(ExitingEnv(), 0, 6, scripted(walk), start=(1.0, 2.0, 90.0))
    # from the reset again (and the warp): the 3 tics after it, still replayable
    assert [int(f[0, 0, 0]) for f in s.frames] == [101, 1, 2, 3] and s.path == walk[:3]
    assert s.actions == [NOOP] + walk[:3] and s.start_position == (1.0, 2.0, 90.0)
    s = start_scene(ExitingEnv(), 0, 6, scripted(walk), on_exit="cut")
    # from the restarted map's first frame, as the game goes on
    assert [int(f[0, 0, 0]) for f in s.frames] == [200, 4, 5, 6] and s.path is None
    with pytest.raises(RuntimeError):
        s.replay()
    with pytest.raises(ValueError):
        start_scene(ExitingEnv(), 0, 1, standing_still, on_exit="never")


def test_warmup_actions_stand_still_first_then_walk():
    import random

    assert warmup_actions(5, None) == [NOOP] * 5
    walk = warmup_actions(40, random.Random(7))
    assert len(walk) == 40 and walk == warmup_actions(40, random.Random(7)) and any(a.move for a in walk)
