"""DreamEnv: the Gymnasium env over WorldModel (tiny random model, CPU)."""
from __future__ import annotations

import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from worldmodel.game.action import Action, encode_actions
from worldmodel.inference.dream_env import ENV_ID, DreamEnv, to_action
from worldmodel.inference.engine import WorldModel

SMALL = dict(frame_size=(32, 48), latent_channels=4, ae_channels=(8, 8, 8, 8), ae_res_blocks=(0, 0, 0, 0),
             dim=32, depth=2, heads=2, sink_frames=1, window_frames=3, max_draft=4)



def small_model(**settings) -> WorldModel:
    wm = WorldModel.from_preset("tiny", device="cpu", cfg_overrides=SMALL, steps=1, **settings)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in wm.transformer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1 / math.sqrt(p.shape[-1]) if p.ndim > 1 else 0.1))
    return wm


def clips(n=2, length=5):
    rng = np.random.default_rng(0)
    return [(rng.integers(0, 256, (length, 32, 48, 3), dtype=np.uint8), [Action(move=1)] * length) for _ in range(n)]


def test_dream_env_passes_the_gymnasium_env_checker():
    env = DreamEnv(small_model(), clips=clips(), max_episode_steps=10, render_mode="rgb_array")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*symmetric and normalized space.*")  # turn is in degrees
        warnings.filterwarnings("ignore", message=".*not having a spec.*")
        check_env(env, skip_render_check=False)
    made = gym.make(ENV_ID, model=small_model(), clips=clips(), max_episode_steps=10, render_mode="rgb_array")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*symmetric and normalized space.*")
        check_env(made.unwrapped)
    obs, info = made.reset(seed=3)
    assert made.observation_space.contains(obs)


def test_dream_env_steps_and_truncates_and_is_deterministic():
    env = DreamEnv(small_model(), clips=clips(), max_episode_steps=3)
    obs, info = env.reset(seed=1)
    assert obs.shape == (32, 48, 3) and obs.dtype == np.uint8 and info["frame"] == 0
    first = []
    for i in range(3):
        a = {"move": 1, "strafe": 0, "turn": np.array([2.5], np.float32), "attack": 0, "use": i == 1}
        obs, reward, terminated, truncated, info = env.step(a)
        first.append(obs)
        assert reward == 0.0 and not terminated and truncated == (i == 2)
    env.reset(seed=1)
    again = [env.step(Action(move=1, turn=2.5, use=(i == 1)))[0] for i in range(3)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    obs, _ = env.reset(options={"frames": clips(1, 4)[0][0], "actions": [Action()] * 4})
    assert np.array_equal(obs, clips(1, 4)[0][0][-1])


def test_dream_env_action_space_maps_onto_action():
    space = DreamEnv(small_model(), clips=clips()).action_space
    space.seed(0)
    for _ in range(20):
        a = to_action(space.sample())
        assert isinstance(a, Action) and -15 <= a.turn <= 15
    assert to_action({"move": -1, "strafe": 1, "turn": [-3.25], "attack": 1, "use": 0}) == \
        Action(move=-1, strafe=1, turn=-3.25, attack=True)


def test_dream_env_bad_input():
    env = DreamEnv(small_model(), clips=clips())
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(Action())
    env.reset(seed=0)
    for bad in [{"move": 2, "strafe": 0, "turn": [0.0], "attack": 0, "use": 0},
                {"move": 0, "strafe": 0, "turn": [float("nan")], "attack": 0, "use": 0},
                {"move": 0, "strafe": 0, "turn": [30.0], "attack": 0, "use": 0},
                {"move": 0}, "forward"]:
        with pytest.raises(ValueError):
            env.step(bad)
    with pytest.raises(ValueError, match="shape"):
        env.reset(options={"frames": np.zeros((2, 16, 16, 3), np.uint8), "actions": [Action()] * 2})
    with pytest.raises(ValueError, match="no start clips"):
        DreamEnv(small_model(), start="clips")


def test_dream_env_starts_from_checkpoint_start_clips(tmp_path):
    wm = small_model()
    wm.save_pretrained(tmp_path)
    (tmp_path / "start_clips").mkdir()
    frames, actions = clips(1)[0]
    np.savez(tmp_path / "start_clips" / "000.npz", frames=frames, actions=encode_actions(actions).numpy())
    env = DreamEnv(tmp_path, device="cpu", steps=1)
    assert env.start == "clips" and len(env.clips) == 1
    obs, info = env.reset(seed=0)
    assert np.array_equal(obs, frames[-1]) and info["start"] == "clip 0"


@pytest.mark.slow
def test_dream_env_starts_from_the_real_game():
    pytest.importorskip("vizdoom")
    env = DreamEnv(small_model(), start="game", map="MAP01", context=3, max_episode_steps=2)
    try:
        obs, info = env.reset(seed=0)
        assert obs.shape == (32, 48, 3) and info["start"] == "freedoom2 MAP01"
        assert env.step(Action(move=1))[0].shape == (32, 48, 3)
    finally:
        env.close()
