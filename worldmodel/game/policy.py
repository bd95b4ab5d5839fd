"""A built-in exploration policy that plays roughly like a person with a keyboard and a mouse.

Used to collect training data (`worldmodel collect`), by `worldmodel record` as a built-in policy, and
to make human-like action traces for benchmarks (`explorer_actions`). Deterministic for a seed (and, when
positions / depth buffers are given, for the same sequence of them).

What it does, one call per game tic (1/35 s):
- keys are *held*: forward most of the time, sometimes nothing, backwards about one frame in ten
  (a world model must learn to back up too), strafes left/right now and then, each for a duration
  drawn from a log-normal (a fraction of a second to several seconds); with `straight_back` > 0 that
  share of the backward holds backs off straight (mouse at rest, no strafe), as a player steps back to
  look at what is ahead: off by default, so the evaluation's episodes stay as they are;
- the mouse turns in *gestures*: a smooth bell-shaped speed profile (sin^2) with a random peak speed
  (slow looks to fast flicks, up to TURN_MAX degrees a tic) and a random total angle, both directions,
  separated by pauses with a little hand jitter;
- it fires in bursts and taps USE every few seconds (doors, switches, lifts);
- given the engine's depth buffer (`DoomEnv(depth=True).depth`) it looks where it goes, as a person
  does: when a wall comes close ahead it either turns towards the more open side, or walks up to it,
  presses USE (it may be a door) and waits a moment; turning away close to a wall, it stops or backs
  off; its free looks lean towards open space;
- given the player's position (x, y, angle) it notices when it is stuck (pushing a key but barely
  moving for a while), taps USE, backs off and turns away with a big fast turn.
Without depth and position it is "blind": the same keyboard and mouse habits, and it walks into walls.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Sequence

import numpy as np

from worldmodel.game.action import TURN_MAX, Action

POLICY_VERSION = "explorer-2"  # bump when the behaviour changes: datasets record which policy made them
STUCK_WINDOW = 20  # tics of history looked at for stuck detection
STUCK_DISTANCE = 40.0  # map units: moved less than this over the window while pushing a key = stuck
                       # (running covers ~16 units a tic, so 20 tics of free running is ~300 units)
NEAR_WALL = 24  # depth-buffer units (about 7 map units each): closer than this ahead = a wall ahead
TOUCH = 8  # depth-buffer units: close enough to USE what is ahead (Doom's use range is 64 map units)
CLEAR = 32  # depth-buffer units: a turn away from a wall stops once this much room is ahead
PROBE_P = 0.2  # chance that a wall ahead is walked up to and USEd (it may be a door) rather than avoided
BACK_OFF_P = 0.5  # chance that turning away close to a wall backs off from it rather than stopping

FREE, AVOID, PROBE, WAIT, ESCAPE = "free", "avoid", "probe", "wait", "escape"


class _Held:
    """One held key: a value and how many more tics it is held."""

    __slots__ = ("value", "left")

    def __init__(self):
        self.value, self.left = 0, 0


class ExplorerPolicy:
    """`act(position=None, depth=None) -> Action`, one call per tic. `position` is the player's
    (x, y, angle) (`DoomEnv.position`), `depth` the last frame's depth buffer (`DoomEnv.depth`).
    `straight_back`: the chance that a backward hold is straight (no turn, no strafe) while it lasts."""

    def __init__(self, seed: int = 0, turn_max: float = TURN_MAX, straight_back: float = 0.0):
        if not 0.0 <= straight_back <= 1.0:
            raise ValueError(f"straight_back must be in [0, 1], got {straight_back}")
        self.seed = int(seed)
        self.turn_max = float(turn_max)
        self.straight_back = float(straight_back)
        self.reset()

    def reset(self) -> None:
        """Back to the start (same seed -> same actions again)."""
        self.rng = np.random.default_rng(np.random.SeedSequence([0x5EED, self.seed]))
        self.move, self.strafe = _Held(), _Held()
        self.turn_profile: list[float] = []  # degrees per tic still to play of the current gesture/pause
        self.turn_dir = 1 if self.rng.random() < 0.5 else -1
        self.attack_left = 0
        self.attack_cooldown = self._lognormal(60, 0.7, 10, 400)
        self.use_left = 0
        self.use_cooldown = self._lognormal(70, 0.6, 10, 300)
        self.mode, self.mode_left = FREE, 0  # FREE, or a manoeuvre and its tics left
        self.mode_turn: list[float] = []  # the manoeuvre's own turn profile
        self.open_side = 0  # +1 more room on the right, -1 on the left, 0 unknown / even
        self.last_avoid = self.last_probe = -10**9
        self.back_off = False  # the current AVOID turn backs off from the wall
        self.ahead = 255.0
        self.back_tics = 0
        self.prev_pushing = False  # did the previous action push a movement key
        self.history: deque = deque(maxlen=STUCK_WINDOW)
        self.pushing: deque = deque(maxlen=STUCK_WINDOW)
        self.counts = {AVOID: 0, PROBE: 0, ESCAPE: 0}  # manoeuvres so far (statistics)
        self.steps = 0

    @property
    def stuck_count(self) -> int:
        return self.counts[ESCAPE]

    # -- random helpers ---------------------------------------------------------------------------
    def _lognormal(self, median: float, sigma: float, lo: float, hi: float) -> int:
        return int(round(min(hi, max(lo, median * math.exp(sigma * self.rng.standard_normal())))))

    def _new_move(self):
        r = self.rng.random()
        if r < 0.64:  # by held time: about 80% forward, 10% nothing, 10% backwards
            self.move.value, self.move.left = 1, self._lognormal(45, 0.8, 6, 350)
        elif r < 0.80:
            self.move.value, self.move.left = 0, self._lognormal(20, 0.7, 2, 90)
        else:
            self.move.value, self.move.left = -1, self._lognormal(22, 0.6, 4, 90)
            # drawn only when asked for, so that the default policy's random stream is unchanged
            if self.straight_back and self.rng.random() < self.straight_back:
                self.turn_profile = [0.0] * self.move.left  # the mouse rests while it backs off
                self.strafe.value, self.strafe.left = 0, self.move.left

    def _new_strafe(self):
        if self.rng.random() < 0.65:
            self.strafe.value, self.strafe.left = 0, self._lognormal(45, 0.8, 5, 300)
        else:
            self.strafe.value = 1 if self.rng.random() < 0.5 else -1
            self.strafe.left = self._lognormal(14, 0.7, 3, 90)

    def _gesture(self, angle: float, peak: float, direction: int) -> list[float]:
        """A smooth mouse movement turning about `angle` degrees with peak speed `peak` deg/tic."""
        peak = min(self.turn_max, max(0.2, peak))
        n = int(min(150, max(3, round(2.0 * angle / peak))))
        t = (np.arange(n) + 0.5) / n
        speeds = peak * np.sin(np.pi * t) ** 2
        speeds *= 1.0 + 0.08 * self.rng.standard_normal(n)  # an unsteady hand
        return [float(direction * min(self.turn_max, abs(s))) for s in speeds]

    def _sharp_turn(self, angle: float, peak: float, direction: int) -> list[float]:
        """A quick reaction turn: up to `peak` deg/tic within 3 tics, held, and eased out again."""
        peak = min(self.turn_max, max(1.0, peak))
        ramp = [peak * f for f in (0.35, 0.7, 0.9)]
        n_hold = max(0, int(round((angle - 2 * sum(ramp)) / peak)))
        speeds = np.array(ramp + [peak] * n_hold + ramp[::-1])
        speeds *= 1.0 + 0.06 * self.rng.standard_normal(len(speeds))
        return [float(direction * min(self.turn_max, abs(s))) for s in speeds]

    def _new_turn(self):
        if self.rng.random() < 0.45:  # a pause: the mouse rests, with a little jitter now and then
            n = self._lognormal(14, 0.9, 1, 120)
            jitter = self.rng.random() < 0.3
            self.turn_profile = [float(self.rng.normal(0, 0.25)) if jitter else 0.0 for _ in range(n)]
            return
        if self.open_side and self.rng.random() < 0.7:  # lean towards open space
            self.turn_dir = self.open_side
        elif self.rng.random() >= 0.3:  # else mostly a new random direction, sometimes the same again
            self.turn_dir = 1 if self.rng.random() < 0.5 else -1
        angle = min(240.0, max(2.0, 30.0 * math.exp(0.9 * self.rng.standard_normal())))
        peak = 4.0 * math.exp(0.8 * self.rng.standard_normal())
        self.turn_profile = self._gesture(angle, peak, self.turn_dir)

    # -- looking where it goes --------------------------------------------------------------------------
    @staticmethod
    def clearance(depth: np.ndarray) -> tuple[float, float, float]:
        """Free space (depth units) to the left, straight ahead and to the right, from a band of the
        depth buffer around the horizon (above the weapon; zeros, i.e. the weapon, are ignored)."""
        h, w = depth.shape[:2]
        band = depth[int(0.36 * h):int(0.5 * h):2].astype(np.float32)
        n = (band > 0).sum(axis=0)
        cols = np.where(n > 0, band.sum(axis=0) / np.maximum(n, 1), 255.0)
        a, b = (2 * w) // 5, (3 * w) // 5
        return float(cols[:a].mean()), float(np.sort(cols[a:b])[(b - a) // 4]), float(cols[b:].mean())

    def _start(self, mode: str, tics: int, turn: list[float] | None = None):
        self.mode, self.mode_left, self.mode_turn = mode, int(tics), list(turn or [])
        if mode in self.counts:
            self.counts[mode] += 1

    def _look(self, depth):
        left, ahead, right = self.clearance(depth)
        self.ahead = ahead
        self.open_side = 1 if right > left + 3 else (-1 if left > right + 3 else 0)
        if self.mode == PROBE and ahead < TOUCH:  # at the wall: USE it and wait a moment
            self.use_left = 2
            self._start(WAIT, int(self.rng.integers(10, 25)))
        if self.mode == AVOID and ahead >= CLEAR and len(self.mode_turn) > 2:
            # room ahead again: end the turn smoothly over the next few tics
            self.mode_turn = [t * f for t, f in zip(self.mode_turn[:3], (0.6, 0.35, 0.15))]
            self.mode_left = len(self.mode_turn)
        if self.mode != FREE or ahead >= NEAR_WALL or self.move.value == -1:
            return
        if self.rng.random() < PROBE_P and self.steps - self.last_probe > 100:
            self._start(PROBE, 40)  # a door? walk up to it
            self.last_probe = self.steps
        else:
            if self.steps - self.last_avoid > 20:  # keep the way it turned if it just did (no dithering)
                self.turn_dir = self.open_side or (1 if self.rng.random() < 0.5 else -1)
            turn = self._sharp_turn(float(self.rng.uniform(90, 200)), float(self.rng.uniform(6, 13)), self.turn_dir)
            self._start(AVOID, len(turn), turn)
            self.back_off = self.rng.random() < BACK_OFF_P
            self.last_avoid = self.steps

    # -- stuck detection ----------------------------------------------------------------------------
    def _check_stuck(self, position, pushing: bool) -> bool:
        if position is None:
            return False
        self.history.append((float(position[0]), float(position[1])))
        self.pushing.append(pushing)
        if self.mode == ESCAPE or len(self.history) < STUCK_WINDOW or not all(self.pushing):
            return False
        (x0, y0), (x1, y1) = self.history[0], self.history[-1]
        return math.hypot(x1 - x0, y1 - y0) < STUCK_DISTANCE

    def _escape(self):
        """Stuck: tap USE (it may be a door), back off a little and turn away fast."""
        self.use_left = 2
        self.turn_dir = 1 if self.rng.random() < 0.5 else -1
        turn = self._gesture(float(self.rng.uniform(90, 200)), float(self.rng.uniform(7, self.turn_max)),
                             self.turn_dir)
        self._start(ESCAPE, len(turn), turn)
        self.back_tics = self._lognormal(8, 0.4, 3, 20)
        self.history.clear()
        self.pushing.clear()

    # -- the policy -----------------------------------------------------------------------------------
    def act(self, position: Sequence[float] | None = None, depth: np.ndarray | None = None) -> Action:
        """The action for this tic. position: the player's (x, y, angle); depth: the depth buffer of the
        last frame. Both optional."""
        self.steps += 1
        # the habits: held keys and mouse gestures, running in the background of any manoeuvre
        if self.move.left <= 0:
            self._new_move()
        if self.strafe.left <= 0:
            self._new_strafe()
        if not self.turn_profile:
            self._new_turn()
        self.move.left -= 1
        self.strafe.left -= 1
        move, strafe, turn = self.move.value, self.strafe.value, self.turn_profile.pop(0)

        if self.mode != FREE:
            self.mode_left -= 1
            if self.mode_left < 0:
                self.mode = FREE
        if depth is not None:
            self._look(depth)
        if self._check_stuck(position, self.prev_pushing):
            self._escape()
        # manoeuvres override the habits
        if self.mode == AVOID:
            turn = self.mode_turn.pop(0) if self.mode_turn else 0.0
            if self.ahead < 14:  # close to the wall: stop or back off while turning away
                move = -1 if self.back_off else 0
        elif self.mode == PROBE:
            move, strafe, turn = 1, 0, 0.0
        elif self.mode == WAIT:
            move, strafe, turn = 0, 0, 0.0
        elif self.mode == ESCAPE:
            turn = self.mode_turn.pop(0) if self.mode_turn else 0.0
            move, strafe = (-1, 0) if self.back_tics > 0 else (0, 0)
            self.back_tics -= 1

        attack = self.attack_left > 0
        if attack:
            self.attack_left -= 1
        else:
            self.attack_cooldown -= 1
            if self.attack_cooldown <= 0:
                self.attack_left = self._lognormal(6, 0.9, 1, 40)
                self.attack_cooldown = self._lognormal(100, 0.8, 15, 600)
        use = self.use_left > 0
        if use:
            self.use_left -= 1
        else:
            self.use_cooldown -= 1
            if self.use_cooldown <= 0:
                self.use_left = int(self.rng.integers(1, 3))
                self.use_cooldown = self._lognormal(90, 0.6, 15, 400)
        self.prev_pushing = move != 0 or strafe != 0
        return Action(move=move, strafe=strafe, turn=max(-self.turn_max, min(self.turn_max, turn)),
                      attack=attack, use=use)

    __call__ = act


def explorer_actions(n: int, seed: int = 0) -> list[Action]:
    """n actions of a blind ExplorerPolicy (no positions, no depth): a human-like action trace."""
    policy = ExplorerPolicy(seed)
    return [policy.act() for _ in range(n)]
