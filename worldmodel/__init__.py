"""worldmodel: a neural game engine. See README.md and DESIGN.md."""
from worldmodel.action import ACTION_DIM, Action, load_actions, save_actions

__all__ = ["Action", "ACTION_DIM", "load_actions", "save_actions", "WorldModel", "DreamEnv"]


def __getattr__(name):  # the engine pulls in the model; import it only when asked for
    if name == "WorldModel":
        from worldmodel.engine import WorldModel
        return WorldModel
    if name == "DreamEnv":
        from worldmodel.dream_env import DreamEnv
        return DreamEnv
    raise AttributeError(f"module 'worldmodel' has no attribute {name!r}")
