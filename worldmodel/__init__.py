"""worldmodel: a neural game engine. How to use it: README.md; how it is built: docs/architecture.md.

The public API: `Action`, `WorldModel` (the engine), `DreamEnv` (a Gymnasium env over it), `DoomEnv`
(the real game)."""
import os

# OpenMP threads that spin while waiting make every small per-frame op slow whenever another process
# shares the cores (measured here: about 2 s a frame instead of 29 ms on a busy 2-core machine).
# Passive waiting costs nothing when the machine is idle. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from worldmodel.game.action import ACTION_DIM, Action, load_actions, save_actions

__all__ = ["Action", "ACTION_DIM", "load_actions", "save_actions", "WorldModel", "DreamEnv", "DoomEnv"]


def __getattr__(name):  # the engine pulls in the model, the game ViZDoom: imported only when asked for
    if name == "DoomEnv":
        from worldmodel.game.doom import DoomEnv
        return DoomEnv
    if name == "WorldModel":
        from worldmodel.inference.engine import WorldModel
        return WorldModel
    if name == "DreamEnv":
        from worldmodel.inference.dream_env import DreamEnv
        return DreamEnv
    raise AttributeError(f"module 'worldmodel' has no attribute {name!r}")
