"""The real game: ViZDoom over the Freedoom IWADs that ship inside the `vizdoom` wheel.

`DoomEnv` is the one place where Doom is run — for data collection, for ground truth in evaluation and
for recording. One `step` is one game tic (1/35 s) and returns one frame, rendered and resized exactly
as the training data (`render_resolution` + `resize_frame`, used by everything that compares frames).

Rendering choices (fixed, the same for data and evaluation): no status bar, no crosshair, no pick-up
messages (the rare mid-screen text "... key needed for this door" still shows: ViZDoom cannot hide it);
the weapon sprite is drawn (it is what a player sees and it shows attacking); screen flashes, decals
and particles are left as the game draws them.

Actions (`worldmodel.game.action.Action`) map onto ViZDoom's delta buttons with Doom's *running* speeds
(most players play with always-run; the values are Doom's own `forwardmove`/`sidemove` units, which
ViZDoom passes through unchanged — measured: terminal speed about 16 map units per tic forward):
    move   -> MOVE_FORWARD_BACKWARD_DELTA  = move * FORWARD_SPEED  (50; walking would be 25)
    strafe -> MOVE_LEFT_RIGHT_DELTA        = strafe * STRAFE_SPEED (40; walking would be 24)
    turn   -> TURN_LEFT_RIGHT_DELTA        = turn degrees; positive turns right, i.e. the engine's
              ANGLE variable (counter-clockwise, degrees) *decreases* by `turn`
    attack -> ATTACK, use -> USE.

Episodes never time out (episode_timeout 0) and god mode is on, so the player never dies. The only way
an episode ends on its own is leaving the level (an exit switch or exit line). Then `step` restarts the
same map transparently — a new game episode with the next seed — returns the first frame of the restart
and sets `restarted` to True for that step, so that a recorder can start a new episode there (the frame
is a cut, not a continuation). `episodes` counts game episodes since construction.

Determinism: the same (wad, map, seed, skill, frame_size) and the same list of actions give identical
frames (ViZDoom is seeded with `set_seed`; the first tics of a map, during which the engine ignores input,
are skipped by `reset`, so the first `step` already acts).
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
from typing import Sequence

import cv2
import numpy as np

from worldmodel.game.action import Action
from worldmodel.errors import UserError
from worldmodel.parsing import parse_hw
from worldmodel.game.maps import is_user_wad, split_of

FPS = 35  # Doom's tic rate: one frame per tic
FORWARD_SPEED = 50  # Doom forwardmove units when running (walking: 25)
STRAFE_SPEED = 40  # Doom sidemove units when running (walking: 24)
DEFAULT_SKILL = 3  # "Hurt me plenty"
START_TICS = 7  # after a map (re)starts, the engine ignores input for this many tics; reset() skips them
DEFAULT_FRAME_SIZE = (96, 128)  # (H, W)
WARP_TURN = 45.0  # degrees a tic when `warp` turns the player to a heading

# ViZDoom's 4:3 render resolutions, smallest first: (width, height)
_RES_4_3 = ((160, 120), (200, 150), (256, 192), (320, 240), (400, 300), (512, 384), (640, 480), (800, 600),
            (1024, 768), (1280, 960), (1400, 1050), (1600, 1200))


def private_tmpdir(prefix: str) -> str:
    """A new directory `<tmp>/<prefix><pid>-<random>`. Directories of this prefix whose process is gone
    (killed with kill -9, say) are removed first, so that killed runs do not pile up in /tmp."""
    base = tempfile.gettempdir()
    try:
        for name in os.listdir(base):
            if not name.startswith(prefix):
                continue
            pid = name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(os.path.join(base, name), ignore_errors=True)
    except OSError:
        pass
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=base)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_engines(marker: str) -> list[int]:
    """PIDs of the ViZDoom engine processes whose command line holds `marker` (a DoomEnv's private
    config path `<tmp>/worldmodel-doom-<owner pid>-<random>`, or a prefix of it); [] without /proc."""
    want = marker.encode()
    try:
        pids = [d for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return []
    found = []
    for d in pids:
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"vizdoom" in argv[0] and any(want in a for a in argv):
            found.append(int(d))
    return found


# The engine outlives a Python process killed with SIGKILL (or dying any other way that skips
# close()): nothing in ViZDoom ends it, and it ignores SIGTERM. So each engine gets a watchdog, a
# shell blocked reading a pipe whose only writer is this process: when this process is gone the read
# ends, and the shell kills the engine ($0) if it is still that engine (its command line holds $1).
_WATCHDOG = 'read _; grep -qaF -- "$1" /proc/$0/cmdline 2>/dev/null && kill -9 "$0"'


def _start_watchdog(engine_pid: int, marker: str) -> subprocess.Popen | None:
    try:
        return subprocess.Popen(["sh", "-c", _WATCHDOG, str(engine_pid), marker], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError:
        return None


def use_wad(game, wad: str) -> None:
    """Point a vizdoom.DoomGame at a WAD: a Freedoom IWAD, or a user's WAD file loaded on top of
    freedoom2 (which provides whatever textures, sprites and sounds the file does not bring)."""
    if is_user_wad(wad):
        if not os.path.isfile(wad):
            raise UserError(f"{wad}: no such WAD file")
        game.set_doom_game_path(wad_path("freedoom2"))
        game.set_doom_scenario_path(os.path.abspath(wad))
    else:
        game.set_doom_game_path(wad_path(wad))


def wad_path(wad: str) -> str:
    """Path of a Freedoom IWAD inside the installed vizdoom package."""
    import vizdoom

    if wad not in ("freedoom1", "freedoom2"):
        raise UserError(f"unknown wad {wad!r}; expected freedoom1 or freedoom2")
    path = os.path.join(os.path.dirname(vizdoom.__file__), f"{wad}.wad")
    if not os.path.exists(path):
        raise UserError(f"{path} is missing: the vizdoom wheel should ship {wad}.wad")
    return path


def parse_frame_size(spec: str | Sequence[int]) -> tuple[int, int]:
    """'96x128' (HxW) or (H, W) -> (H, W); a UserError for anything else."""
    if isinstance(spec, str):
        h, w = parse_hw(spec)
    else:
        h, w = (int(v) for v in spec)
    if not (8 <= h <= _RES_4_3[-1][1] and 8 <= w <= _RES_4_3[-1][0]):
        raise UserError(f"frame size {h}x{w} (HxW) is out of range 8x8..{_RES_4_3[-1][1]}x{_RES_4_3[-1][0]}")
    return h, w


def render_resolution(frame_size: Sequence[int]) -> tuple[int, int]:
    """The smallest 4:3 ViZDoom resolution (width, height) that is at least frame_size (H, W) both ways."""
    h, w = parse_frame_size(frame_size)
    for rw, rh in _RES_4_3:
        if rw >= w and rh >= h:
            return rw, rh
    raise UserError(f"no ViZDoom resolution is as large as {h}x{w}")


def resize_frame(frame: np.ndarray, frame_size: Sequence[int]) -> np.ndarray:
    """THE resize from the engine's render to the model's frame size (H, W), uint8 RGB [H,W,3] -> uint8
    [H,W,3] with area averaging. Data collection, evaluation and recording all go through here."""
    h, w = int(frame_size[0]), int(frame_size[1])
    if frame.shape[0] == h and frame.shape[1] == w:
        return np.ascontiguousarray(frame, dtype=np.uint8)
    return cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)


def action_to_buttons(action: Action) -> list[float]:
    """Action -> ViZDoom button values in the order of DoomEnv's buttons
    (MOVE_FORWARD_BACKWARD_DELTA, MOVE_LEFT_RIGHT_DELTA, TURN_LEFT_RIGHT_DELTA, ATTACK, USE)."""
    return [float(action.move * FORWARD_SPEED), float(action.strafe * STRAFE_SPEED), float(action.turn),
            1.0 if action.attack else 0.0, 1.0 if action.use else 0.0]


class DoomEnv:
    """The real Doom, one frame per tic. `reset() -> uint8 [H,W,3]`, `step(action) -> uint8 [H,W,3]`.

    wad: "freedoom2" or "freedoom1"; map: e.g. "MAP01" / "E1M1" (any map: the split is enforced by the
    callers that train or tune); seed: seeds the engine (the n-th game episode uses seed + n);
    frame_size: (H, W) of returned frames; skill: Doom skill 1-5; depth: also keep the engine's depth
    buffer (`env.depth`, uint8 at the render resolution, larger = farther) — the exploration policy uses
    it to look where it goes; the frames are the same either way."""

    fps = FPS

    def __init__(self, wad: str = "freedoom2", map: str = "MAP01", seed: int = 0,
                 frame_size: Sequence[int] | str = DEFAULT_FRAME_SIZE, skill: int = DEFAULT_SKILL,
                 depth: bool = False):
        import vizdoom as vzd

        try:
            split_of(wad, map)
        except ValueError as e:
            raise UserError(str(e)) from None
        if not 1 <= int(skill) <= 5:
            raise UserError(f"skill must be 1-5, got {skill}")
        self.wad, self.map, self.seed, self.skill = wad, map.upper(), int(seed), int(skill)
        self.frame_size = parse_frame_size(frame_size)
        self.render_size = render_resolution(self.frame_size)  # (width, height)
        self.episodes = 0  # game episodes started
        self.restarted = False  # True right after a step in which the level was left and restarted
        self.tic = 0  # steps since the current game episode started (0 right after reset)
        self._frame: np.ndarray | None = None
        self._depth_enabled = bool(depth)
        self._depth: np.ndarray | None = None

        g = vzd.DoomGame()
        self._vzd, self._game = vzd, g
        self._tmp = private_tmpdir("worldmodel-doom-")
        g.set_doom_config_path(os.path.join(self._tmp, "_vizdoom.ini"))  # no .ini in the working directory
        use_wad(g, wad)
        g.set_doom_map(self.map)
        g.set_doom_skill(self.skill)
        g.set_mode(vzd.Mode.PLAYER)
        g.set_screen_resolution(getattr(vzd.ScreenResolution, "RES_%dX%d" % self.render_size))
        g.set_screen_format(vzd.ScreenFormat.RGB24)
        g.set_window_visible(False)
        g.set_sound_enabled(False)
        g.set_render_hud(False)
        g.set_render_minimal_hud(False)
        g.set_render_crosshair(False)
        g.set_render_weapon(True)
        g.set_depth_buffer_enabled(self._depth_enabled)
        g.set_render_messages(False)
        g.set_episode_timeout(0)
        g.set_episode_start_time(0)
        g.set_ticrate(FPS)
        g.set_available_buttons([vzd.Button.MOVE_FORWARD_BACKWARD_DELTA, vzd.Button.MOVE_LEFT_RIGHT_DELTA,
                                 vzd.Button.TURN_LEFT_RIGHT_DELTA, vzd.Button.ATTACK, vzd.Button.USE])
        g.set_available_game_variables([vzd.GameVariable.POSITION_X, vzd.GameVariable.POSITION_Y,
                                        vzd.GameVariable.ANGLE, vzd.GameVariable.HEALTH])
        g.set_seed(self.seed)
        # ViZDoom makes a `_vizdoom` directory in the working directory; make it first (several engines
        # starting at once race on it) and remove it again if it was not there before.
        runtime_dir = os.path.join(os.getcwd(), "_vizdoom")
        existed = os.path.exists(runtime_dir)
        os.makedirs(runtime_dir, exist_ok=True)
        self._watchdog, self._closed, self._started = None, False, False  # close() now stops what has started
        try:
            g.init()
            engines = find_engines(self._tmp)
            self.engine_pid = engines[0] if engines else None  # the engine's process (None without /proc)
            self._watchdog = _start_watchdog(self.engine_pid, self._tmp) if self.engine_pid else None
        except BaseException as e:  # a failed start, or a signal as it started (a worker's SIGTERM): no engine left
            self.close()
            if isinstance(e, Exception):
                raise UserError(f"cannot start ViZDoom on {wad} {self.map}: {e}") from None
            raise
        finally:
            if not existed:
                try:
                    os.rmdir(runtime_dir)
                except OSError:
                    pass

    # -- episode control ---------------------------------------------------------------------------
    def _new_episode(self, seed: int | None = None) -> np.ndarray:
        g = self._game
        if seed is None:
            seed = self.seed + self.episodes
        if self._started or seed != self.seed:
            g.set_seed(int(seed) % 2**32)
            g.new_episode()
        self._started = True
        self.episodes += 1
        g.send_game_command("god")
        for _ in range(START_TICS):  # the engine ignores input during a map's first tics
            g.make_action([0.0] * 5)
        self.tic = 0
        self._frame = self._grab()
        return self._frame

    def reset(self, seed: int | None = None) -> np.ndarray:
        """Start the map again and return its first frame (which counts as produced by the no-op action).
        The game episode is seeded with `seed`, by default with the env's seed + the number of episodes
        played so far (so a fresh env's first reset always plays the same game)."""
        self._check_open()
        self.restarted = False
        return self._new_episode(seed).copy()

    def warp(self, x: float, y: float, heading: float | None = None) -> np.ndarray:
        """Teleport the player to map position (x, y) (Doom's `warp` cheat; the floor there), then turn
        to `heading` (degrees, counter-clockwise, 0 = east) over a few tics. Returns the frame after.
        The tics it takes are not episode frames (the next `step` continues as usual). A UserError if
        the player did not arrive (a position outside the level)."""
        self._check_open()
        if self._frame is None:
            raise RuntimeError("call DoomEnv.reset() before warp()")
        g = self._game
        g.send_game_command(f"warp {float(x):.1f} {float(y):.1f}")
        g.make_action([0.0] * 5, 1)
        px, py, angle = self.position
        if math.hypot(px - x, py - y) > 1.0:
            raise UserError(f"warp to ({x:.0f}, {y:.0f}) on {self.map} failed: the player is at ({px:.0f}, {py:.0f})")
        if heading is not None:
            turn = angle_difference(angle, heading)  # positive: turn right (the engine's angle decreases)
            while abs(turn) > 1e-3:
                d = max(-WARP_TURN, min(WARP_TURN, turn))
                g.make_action([0.0, 0.0, d, 0.0, 0.0], 1)
                turn -= d
        self._frame = self._grab()
        return self._frame.copy()

    def step(self, action: Action) -> np.ndarray:
        """Play one tic with `action` held and return the frame it produced."""
        self._check_open()
        if not isinstance(action, Action):
            raise TypeError(f"DoomEnv.step takes an Action, got {type(action).__name__}")
        if self._frame is None:
            raise RuntimeError("call DoomEnv.reset() before step()")
        g = self._game
        g.make_action(action_to_buttons(action), 1)
        if g.is_episode_finished():  # the level was left (exit): restart it, tell the caller
            self.restarted = True
            return self._new_episode().copy()
        self.restarted = False
        self.tic += 1
        self._frame = self._grab()
        return self._frame.copy()

    def _grab(self) -> np.ndarray:
        state = self._game.get_state()
        if self._depth_enabled:
            self._depth = state.depth_buffer
        return resize_frame(state.screen_buffer, self.frame_size)

    # -- state ---------------------------------------------------------------------------------------
    @property
    def position(self) -> tuple[float, float, float]:
        """(x, y, angle): map units and degrees (counter-clockwise, 0 = east), for stuck detection."""
        self._check_open()
        g = self._game
        v = self._vzd.GameVariable
        return (float(g.get_game_variable(v.POSITION_X)), float(g.get_game_variable(v.POSITION_Y)),
                float(g.get_game_variable(v.ANGLE)))

    @property
    def depth(self) -> np.ndarray | None:
        """The depth buffer of the last frame (uint8 [h,w] at the render resolution; larger = farther),
        or None unless the env was made with depth=True. Read-only, valid until the next step."""
        return self._depth

    @property
    def health(self) -> float:
        return float(self._game.get_game_variable(self._vzd.GameVariable.HEALTH))

    @property
    def frame(self) -> np.ndarray | None:
        """The last frame returned (a copy), or None before reset()."""
        return None if self._frame is None else self._frame.copy()

    # -- lifetime ------------------------------------------------------------------------------------
    def _check_open(self):
        if self._closed:
            raise RuntimeError("this DoomEnv is closed")

    def close(self) -> None:
        if not getattr(self, "_closed", True):
            self._closed = True
            try:
                self._game.close()
            finally:
                shutil.rmtree(self._tmp, ignore_errors=True)
                if self._watchdog is not None:  # the engine is closed: the watchdog has nothing to do
                    self._watchdog.kill()
                    self._watchdog.wait()
                    self._watchdog.stdin.close()

    def __enter__(self) -> "DoomEnv":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        h, w = self.frame_size
        return f"DoomEnv({self.wad} {self.map}, seed={self.seed}, frame_size={h}x{w}, skill={self.skill})"


def angle_difference(a: float, b: float) -> float:
    """Signed smallest difference a - b in degrees, in (-180, 180]."""
    d = math.fmod(a - b, 360.0)
    if d > 180.0:
        d -= 360.0
    elif d <= -180.0:
        d += 360.0
    return d
