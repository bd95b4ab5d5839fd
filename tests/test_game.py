"""DoomEnv: the real game, headless, one frame per tic, deterministic."""
import os

import numpy as np
import pytest

from worldmodel.game.action import NOOP, Action
from worldmodel.errors import UserError
from worldmodel.game.doom import (FORWARD_SPEED, STRAFE_SPEED, DoomEnv, action_to_buttons, angle_difference,
                             parse_frame_size, render_resolution, resize_frame)

SMALL = (24, 32)


def random_actions(n, seed):
    rng = np.random.default_rng(seed)
    return [Action(move=int(rng.integers(-1, 2)), strafe=int(rng.integers(-1, 2)),
                   turn=float(rng.uniform(-6, 6)), attack=bool(rng.random() < 0.1), use=bool(rng.random() < 0.05))
            for _ in range(n)]


def play(actions, seed=0, map="MAP01", frame_size=SMALL):
    with DoomEnv(map=map, seed=seed, frame_size=frame_size) as env:
        frames = [env.reset()] + [env.step(a) for a in actions]
        return np.stack(frames), env.position


def test_render_resolution_is_smallest_4_3_at_least_frame_size():
    assert render_resolution((96, 128)) == (160, 120)
    assert render_resolution((120, 160)) == (160, 120)
    assert render_resolution((121, 160)) == (200, 150)
    assert render_resolution((224, 384)) == (400, 300)
    assert parse_frame_size("96x128") == (96, 128)
    with pytest.raises(UserError):
        parse_frame_size("96-128")
    with pytest.raises(UserError):
        parse_frame_size((2000, 3000))


def test_resize_frame_shared_area_resize():
    src = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    out = resize_frame(src, (96, 128))
    assert out.shape == (96, 128, 3) and out.dtype == np.uint8
    assert resize_frame(out, (96, 128)) is not None and np.array_equal(resize_frame(out, (96, 128)), out)
    flat = np.full((120, 160, 3), 77, np.uint8)
    assert np.all(resize_frame(flat, (24, 32)) == 77)  # area averaging keeps flat colours exactly


def test_action_to_buttons():
    assert action_to_buttons(NOOP) == [0.0] * 5
    b = action_to_buttons(Action(move=1, strafe=-1, turn=-7.5, attack=True, use=True))
    assert b == [FORWARD_SPEED, -STRAFE_SPEED, -7.5, 1.0, 1.0]


def test_unknown_map_or_wad_is_a_clear_error():
    with pytest.raises(UserError, match="MAP99"):
        DoomEnv(map="MAP99")
    with pytest.raises(UserError, match="doom2"):
        DoomEnv(wad="doom2")


def test_reset_step_shapes_and_first_step_acts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ViZDoom leaves nothing in the working directory
    with DoomEnv(frame_size=SMALL) as env:
        f0 = env.reset()
        assert f0.shape == (24, 32, 3) and f0.dtype == np.uint8
        assert env.frame_size == SMALL and env.tic == 0
        x0, y0, a0 = env.position
        env.step(Action(turn=10.0))  # positive turn = turn right = the engine's angle decreases
        assert angle_difference(env.position[2], a0) == pytest.approx(-10.0, abs=0.05)
        env.step(Action(turn=-4.0))
        assert angle_difference(env.position[2], a0) == pytest.approx(-6.0, abs=0.05)
        for _ in range(10):
            f = env.step(Action(move=1))
        x1, y1, a1 = env.position
        heading = np.radians(a1)
        moved = np.array([x1 - x0, y1 - y0])
        assert moved @ np.array([np.cos(heading), np.sin(heading)]) > 50  # forward is where it faces
        assert env.tic == 12 and f.shape == (24, 32, 3) and not env.restarted
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError):
        env.step(NOOP)


def test_deterministic_for_seed_and_actions():
    acts = random_actions(150, seed=1)
    a, pa = play(acts, seed=0)
    b, pb = play(acts, seed=0)
    assert np.array_equal(a, b) and pa == pb
    c, _ = play(acts, seed=5)  # another seed: monsters and randomness differ
    assert not np.array_equal(a, c)
    d, _ = play(random_actions(150, seed=2), seed=0)  # other actions: other frames
    assert not np.array_equal(a, d)


def test_reset_with_explicit_seed_replays():
    acts = random_actions(40, seed=3)
    with DoomEnv(frame_size=SMALL, seed=0) as env:
        first = [env.reset()] + [env.step(a) for a in acts]
        second = [env.reset(seed=0)] + [env.step(a) for a in acts]
    assert np.array_equal(np.stack(first), np.stack(second))


def test_leaving_the_level_restarts_transparently(monkeypatch):
    with DoomEnv(frame_size=SMALL) as env:
        first = env.reset()
        for _ in range(5):
            env.step(Action(move=1))
        finished = iter([True])

        class ExitOnce:  # the engine reports the end of the episode once, as when an exit is used
            def __init__(self, game):
                self.game = game

            def is_episode_finished(self):
                return next(finished, False)

            def __getattr__(self, name):
                return getattr(self.game, name)

        monkeypatch.setattr(env, "_game", ExitOnce(env._game))
        f = env.step(Action(move=1))  # the engine says the episode ended (an exit): the map restarts
        assert env.restarted and env.tic == 0 and env.episodes == 2
        assert f.shape == first.shape
        env.step(NOOP)
        assert not env.restarted and env.tic == 1


ENGINE_SCRIPT = """
import sys, time
from worldmodel.game.doom import DoomEnv
env = DoomEnv(map="MAP01", frame_size=(24, 32))
env.reset()
print(env.engine_pid, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_the_engine_does_not_outlive_its_process(sig):
    """ViZDoom's engine is a process of its own that ignores SIGTERM and is never told when its
    controller dies: a Python process killed outright must not leave it running for ever."""
    import signal
    import subprocess
    import sys
    import time

    from helpers import engines_of

    proc = subprocess.Popen([sys.executable, "-c", ENGINE_SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        engine = int(proc.stdout.readline())
        assert engines_of(proc.pid) == [engine]
    finally:
        proc.send_signal(getattr(signal, sig))
        proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while engines_of(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engines_of(proc.pid) == []


def test_close_ends_the_engine_and_its_watchdog():
    from helpers import engines_of

    env = DoomEnv(map="MAP01", frame_size=(24, 32))  # (other tests' envs may still be open here)
    assert env.engine_pid in engines_of(os.getpid()) and env._watchdog.poll() is None
    env.close()
    assert env.engine_pid not in engines_of(os.getpid()) and env._watchdog.poll() is not None


def test_an_interrupt_as_the_engine_starts_leaves_no_engine(monkeypatch):
    """A signal handled just after ViZDoom's engine started (a collect worker's SIGTERM becomes SystemExit
    there) must stop that engine: the constructor never returned, so no `with` or close() can."""
    import vizdoom

    from helpers import engines_of

    class Interrupted(vizdoom.DoomGame):
        def init(self):
            super().init()
            raise SystemExit(143)

    before = set(engines_of(os.getpid()))  # (other tests' envs may still be open here)
    monkeypatch.setattr(vizdoom, "DoomGame", Interrupted)
    with pytest.raises(SystemExit) as raised:
        DoomEnv(map="MAP01", frame_size=(24, 32))
    # checked while the traceback (and with it the half-made env) is alive, as in a process that is exiting
    assert raised.tb is not None and set(engines_of(os.getpid())) <= before
