"""What the front-end can drive: anything with `reset() -> frame` and `step(action) -> frame`.

- `DreamGame`: the world model, seeded from a start scene (the real game's first frames on a map, or a
  start clip shipped with the checkpoint). While its start scene came from the real game, it also steps
  that game with the same actions (`companion_frame`), so the real game can be shown beside the dream.
- `RealGame`: the real Doom (`worldmodel.game.doom.DoomEnv`).
- `ReplayGame`: a recorded MP4 played back frame by frame (actions are ignored).

All of them are stepped from the worker thread (play/worker.py), never from the UI thread.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from worldmodel.game.action import Action
from worldmodel.errors import UserError


class Game(Protocol):
    name: str
    kind: str  # "dream", "real", "replay"
    frame_size: tuple[int, int]
    fps: int
    model: Any  # the WorldModel of the dream, else None
    real_starts: Any  # the real game's start scenes beside the dream (RealStarts), else None
    scene: Any  # the current StartScene (None for a replay)
    companion_frame: np.ndarray | None  # the real game's frame beside the dream, when it runs in lockstep
    has_companion: bool

    def reset(self) -> np.ndarray: ...

    def step(self, action: Action) -> np.ndarray: ...

    # optional, for a game whose frames come in two stages (the dream): step(a) == render(advance(a)),
    # and the worker may run render on another thread while the next frame advances (play/worker.py)
    # def advance(self, action: Action) -> Any: ...
    # def render(self, advanced: Any) -> np.ndarray: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------------------------------
# Start scenes
# --------------------------------------------------------------------------------------------------


@dataclass
class StartScene:
    frames: np.ndarray  # uint8 (N, H, W, 3)
    actions: list[Action]  # actions[i] produced frames[i]
    label: str
    env: Any = None  # the DoomEnv left in the state of frames[-1], when the scene came from the real game


class RealStarts:
    """Start scenes from the real game: a DoomEnv on `map`, reset with a new seed each time, a warm-up,
    and the last `context` frames with their actions. The first start stands still (deterministic);
    later ones walk a little at random first so that Backspace gives a fresh scene."""

    def __init__(self, map: str = "MAP01", wad: str = "freedoom2", frame_size=(96, 128), seed: int = 0,
                 context: int = 8, max_walk: int = 105):
        self.map, self.wad, self.frame_size, self.seed = map, wad, tuple(frame_size), int(seed)
        self.context, self.max_walk = max(1, int(context)), int(max_walk)
        self.count = 0
        self.env = None

    def _env(self):
        if self.env is None:
            from worldmodel.game.doom import DoomEnv

            self.env = DoomEnv(wad=self.wad, map=self.map, seed=self.seed, frame_size=self.frame_size)
        return self.env

    def next(self) -> StartScene:
        from worldmodel.game.scenes import scripted, start_scene, warmup_actions

        env = self._env()
        n = self.count
        self.count += 1
        rng = None if n == 0 else random.Random(self.seed * 1000003 + n)
        walk = 0 if rng is None else rng.randint(0, self.max_walk)
        steps = walk + self.context - 1
        scene = start_scene(env, self.seed + n, steps, scripted(warmup_actions(steps, rng)), on_exit="cut")
        frames, actions = scene.context(self.context)
        return StartScene(frames, actions, f"{self.wad} {self.map} start {n}", env=env)

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None


class ClipStarts:
    """Start scenes from the clips shipped with a checkpoint: needs no dataset and no game."""

    def __init__(self, clips: Sequence[tuple[np.ndarray, list[Action]]], context: int = 8, name: str = "clip"):
        if not clips:
            raise UserError("no start clips")
        self.clips, self.context, self.name = list(clips), max(1, int(context)), name
        self.count = 0

    def next(self) -> StartScene:
        i = self.count % len(self.clips)
        self.count += 1
        frames, actions = self.clips[i]
        return StartScene(frames[-self.context:], actions[-self.context:], f"{self.name} {i}")

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# Games
# --------------------------------------------------------------------------------------------------


@dataclass
class DreamGame:
    """The world model as a game. `starts` gives the start scenes; `real_starts` (optional) gives
    start scenes from the real game, used for the side-by-side view."""

    model: Any  # worldmodel.WorldModel
    starts: Any  # RealStarts | ClipStarts
    real_starts: Any = None
    kind: str = "dream"
    follow_real: bool = False  # next reset() starts from the real game so that it can be shown beside
    scene: StartScene | None = field(default=None, init=False)
    companion_frame: np.ndarray | None = field(default=None, init=False)

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def frame_size(self) -> tuple[int, int]:
        return tuple(self.model.frame_size)

    @property
    def fps(self) -> int:
        return int(self.model.fps)

    @property
    def has_companion(self) -> bool:
        """The real game is running in lockstep (same start, same actions)."""
        return self.scene is not None and self.scene.env is not None

    def reset(self) -> np.ndarray:
        source = self.starts
        if self.follow_real and not isinstance(self.starts, RealStarts) and self.real_starts is not None:
            source = self.real_starts
        self.scene = source.next()
        self.model.reset(self.scene.frames, self.scene.actions)
        self.companion_frame = self.scene.frames[-1] if self.scene.env is not None else None
        return self.scene.frames[-1]

    def step(self, action: Action) -> np.ndarray:
        return self.render(self.advance(action))

    def advance(self, action: Action):
        """Stage 1: the real game beside the dream (if it runs) and the model's transformer -> a latent."""
        if self.scene is not None and self.scene.env is not None:
            self.companion_frame = self.scene.env.step(action)  # the real game, ~0.2 ms a tic
        return self.model.step_latent(action)

    def render(self, latent) -> np.ndarray:
        """Stage 2: the latent decoded to a frame."""
        return self.model.decode(latent)

    def close(self) -> None:
        for s in (self.starts, self.real_starts):
            if s is not None:
                s.close()


class RealGame:
    """The real Doom in the same window (no model needed)."""

    kind = "real"
    model = None
    real_starts = None
    companion_frame = None
    has_companion = False

    def __init__(self, starts: RealStarts):
        self.starts = starts
        self.frame_size = tuple(starts.frame_size)
        self.fps = 35
        self.name = f"real game ({starts.wad} {starts.map})"
        self.scene: StartScene | None = None

    def reset(self) -> np.ndarray:
        self.scene = self.starts.next()
        return self.scene.frames[-1]

    def step(self, action: Action) -> np.ndarray:
        return self.scene.env.step(action)

    def close(self) -> None:
        self.starts.close()


class ReplayGame:
    """A recording (MP4) played back; the actions the player gives are ignored."""

    kind = "replay"
    model = None
    real_starts = None
    scene = None
    companion_frame = None
    has_companion = False

    def __init__(self, path: str | Path, fps: int = 35):
        from worldmodel.data.recording import read_video

        path = Path(path)
        try:
            frames = list(read_video(path))
        except ValueError as e:  # names the file and what ffmpeg found wrong
            raise UserError(f"cannot replay {e}") from None
        except (OSError, RuntimeError) as e:
            raise UserError(f"{path}: cannot read the recording: {e}") from None
        if not frames:
            raise UserError(f"{path}: no frames could be read (is it an MP4 written by `worldmodel record`?)")
        self.frames = frames
        self.frame_size = frames[0].shape[:2]
        self.fps = int(fps)
        self.name = f"replay {path.name}"
        self.i = 0

    def reset(self) -> np.ndarray:
        self.i = 0
        return self.frames[0]

    def step(self, action: Action) -> np.ndarray:
        self.i = (self.i + 1) % len(self.frames)
        return self.frames[self.i]

    def close(self) -> None:
        pass
