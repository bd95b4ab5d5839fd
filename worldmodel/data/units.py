"""What `worldmodel collect` plays (the method: worldmodel/data/collect.py): its configuration, the
deterministic units of a collection (`plan`), and the worker that plays one unit and writes its shards."""
from __future__ import annotations

import math
import multiprocessing.util
import os
import shutil
import signal
from dataclasses import dataclass, field

import numpy as np

from worldmodel.data import dataset as ds
from worldmodel.data import writer
from worldmodel.errors import UserError
from worldmodel.game.maps import TRAIN_MAPS, VAL_MAPS, HeldOutMapError, check_map, split_of

SEGMENT_STRIDE = 1_000_000_000
STARTS = ("map", "level")  # where episodes start: the map's player start, or start cells all over the level


@dataclass
class CollectConfig:
    frames: int
    maps: list = field(default_factory=lambda: list(TRAIN_MAPS))
    split: str = "train"
    wad: str = "freedoom2"
    frame_size: list = field(default_factory=lambda: [96, 128])
    seed: int = 0
    episode_frames: int = 1024
    shard_frames: int = 256
    warmup_frames: int = 512
    skill: int = 3
    starts: str = "map"
    policy: str = ""
    straight_back: float = 0.0  # the policy's share of straight backward holds (ExplorerPolicy)
    format: int = 1

    def __post_init__(self):
        from worldmodel.game.policy import POLICY_VERSION

        self.policy = self.policy or POLICY_VERSION
        self.frame_size = [int(v) for v in self.frame_size]
        for name in ("frames", "episode_frames", "shard_frames"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.warmup_frames < 0:
            raise UserError("--warmup-frames must be >= 0")
        if not 0.0 <= self.straight_back <= 1.0:  # also refuses NaN
            raise UserError(f"--straight-back must be between 0 and 1, got {self.straight_back}")
        if self.starts not in STARTS:
            raise UserError(f"--starts must be one of {', '.join(STARTS)}, got {self.starts!r}")
        if self.starts == "level" and len(self.maps) != 1:
            raise UserError("--starts level collects one map (a level model's level), e.g. --maps MAP01")
        # a level model's validation data are held-out episodes of its own (training) level
        check_maps(self.wad, self.maps, "train" if self.starts == "level" else self.split)


def check_maps(wad: str, maps: list[str], split: str) -> None:
    """Training collection: training maps only. Validation (split 'val'): validation maps only.
    Held-out maps: never. A UserError (HeldOutMapError) that names the map."""
    if split not in ("train", "val"):
        raise UserError(f"--split must be train or val, got {split!r}")
    if not maps:
        raise UserError("no map to collect from")
    for m in maps:
        try:
            check_map(wad, m, split)
            kind = split_of(wad, m)
        except HeldOutMapError as e:
            raise UserError(f"refusing to collect: {e}") from None
        except ValueError as e:
            raise UserError(str(e)) from None
        if split == "val" and kind != "val":
            raise UserError(f"--split val collects validation maps only ({VAL_MAPS[0]}-{VAL_MAPS[-1]}); "
                            f"{m} is a {kind} map")


def unit_seed(seed: int, k: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(k), 0xC0]).generate_state(1)[0] >> 1)


def episode_id(k: int, segment: int) -> int:
    return int(k) + int(segment) * SEGMENT_STRIDE


def shard_name(k: int, part: int) -> str:
    return f"{ds.SHARD_DIR}/ep{k:06d}-{part:04d}.npz"


@dataclass
class Unit:
    k: int
    map: str
    seed: int  # the engine's and the policy's
    frames: int
    warmup: int
    parts: list  # [(part, start, count, name)]
    start: tuple | None = None  # (x, y, heading in degrees) to warp to first; None: the map's player start


def plan(cfg: CollectConfig) -> list[Unit]:
    """The deterministic units of a collection."""
    units = []
    n_units = math.ceil(cfg.frames / cfg.episode_frames)
    cells = None
    if cfg.starts == "level":
        from worldmodel.game.level import episode_seed, load_level

        split = "train" if cfg.split == "train" else "eval"
        level = load_level(cfg.wad, cfg.maps[0])
        cells = level.centre(level.starts(split))
    for k in range(n_units):
        n = min(cfg.episode_frames, cfg.frames - k * cfg.episode_frames)
        s = unit_seed(cfg.seed, k)
        rng = np.random.default_rng(s)
        warm = int(rng.integers(0, cfg.warmup_frames + 1)) if cfg.warmup_frames else 0
        parts = [(p, a, min(cfg.shard_frames, n - a), shard_name(k, p))
                 for p, a in enumerate(range(0, n, cfg.shard_frames))]
        start = None
        if cells is not None:  # training: a random start cell; held-out episodes: each start place in turn
            x, y = cells[rng.integers(len(cells)) if split == "train" else k % len(cells)]
            start, s = (float(x), float(y), float(rng.uniform(0.0, 360.0))), episode_seed(split, s)
        units.append(Unit(k, cfg.maps[k % len(cfg.maps)], s, n, warm, parts, start))
    return units


# -- the worker: play one unit ---------------------------------------------------------------------------
_QUEUE = None
_PLAYING = False  # a unit is being played (a game engine is open)
_TMPDIR = None
_PARENT = None  # the main process's pid


def init_worker(q, parent: int):
    global _QUEUE, _TMPDIR, _PARENT
    from worldmodel.game.doom import private_tmpdir

    _QUEUE, _PARENT = q, parent
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C
    # the main process stops workers with SIGTERM (pool.terminate)
    signal.signal(signal.SIGTERM, _worker_sigterm)
    _die_with_parent()
    # ViZDoom makes a `_vizdoom` directory in the working directory: give each worker its own
    _TMPDIR = d = private_tmpdir("worldmodel-collect-")
    os.chdir(d)
    multiprocessing.util.Finalize(None, shutil.rmtree, args=(d,), kwargs={"ignore_errors": True}, exitpriority=0)


def _worker_sigterm(signum, frame):
    signal.signal(signum, signal.SIG_DFL)  # once: a second signal ends the process outright
    if _PLAYING:  # unwind, so that the game engine (a child process of ViZDoom's) is closed, not left behind
        raise SystemExit(128 + signum)
    # idle, or already exiting (an exception raised inside exit handlers only prints tracebacks)
    shutil.rmtree(_TMPDIR, ignore_errors=True)
    os._exit(128 + signum)


def _die_with_parent() -> None:
    """A killed main process (kill -9: it cannot stop its pool) makes its workers stop as if it had, with
    SIGTERM, quietly, instead of finishing their units and dying on a broken pipe: Linux sends the signal
    (PR_SET_PDEATHSIG); elsewhere `_send` notices the new parent."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        pass
    _parent_check()  # it died before that


def _parent_check() -> None:
    if _PARENT is not None and os.getppid() != _PARENT:
        _worker_sigterm(signal.SIGTERM, None)


def _send(msg):
    if _QUEUE is not None:
        _parent_check()
        _QUEUE.put(msg)


def run_unit(cfg: dict, unit: Unit, needed: list[int], root: str) -> list[dict]:
    """Play unit `unit` from its start and write the parts listed in `needed`; returns their entries."""
    global _PLAYING
    _PLAYING = True
    try:
        return _play_unit(cfg, unit, needed, root)
    finally:
        _PLAYING = False


def _play_unit(cfg: dict, unit: Unit, needed: list[int], root: str) -> list[dict]:
    from worldmodel.game.action import NOOP
    from worldmodel.game.doom import DoomEnv
    from worldmodel.game.policy import ExplorerPolicy

    needed = set(needed)
    last = max(needed)
    end = unit.parts[last][1] + unit.parts[last][2]
    part_of = {}
    for p, a, c, _ in unit.parts:
        part_of.update({i: p for i in range(a, a + c)})
    noop = np.asarray(NOOP.to_vector(), np.float32)
    entries = []
    buf: dict[str, list] = {k: [] for k in ("frames", "actions", "episode", "frame_index", "map", "position")}
    pending_progress = 0
    with DoomEnv(cfg["wad"], unit.map, seed=unit.seed, frame_size=cfg["frame_size"], skill=cfg["skill"],
                 depth=True) as env:
        policy = ExplorerPolicy(unit.seed, straight_back=cfg["straight_back"])
        frame = env.reset()
        if unit.start is not None:
            frame = env.warp(*unit.start)
        for _ in range(unit.warmup):
            env.step(policy.act(env.position, env.depth))
        if unit.warmup or unit.start is not None:
            frame = env.step(NOOP)
        segment, fi, action = 0, 0, noop
        for i in range(end):
            if i > 0:
                a = policy.act(env.position, env.depth)
                frame = env.step(a)
                action = np.asarray(a.to_vector(), np.float32)
                fi += 1
                if env.restarted:  # left the level: the map restarted, a new episode begins here
                    segment, fi, action = segment + 1, 0, noop
            p = part_of[i]
            if p in needed:
                buf["frames"].append(frame)
                buf["actions"].append(action)
                buf["episode"].append(episode_id(unit.k, segment))
                buf["frame_index"].append(fi)
                buf["map"].append(unit.map)
                buf["position"].append(env.position)
                pending_progress += 1
                if pending_progress >= 64:
                    _send(("frames", pending_progress))
                    pending_progress = 0
                _, start, count, name = unit.parts[p]
                if i == start + count - 1:  # the part is complete: write its shard
                    arrays = {"frames": np.stack(buf["frames"]), "actions": np.stack(buf["actions"]),
                              "episode": np.asarray(buf["episode"], np.int64),
                              "frame_index": np.asarray(buf["frame_index"], np.int32),
                              "map": np.asarray(buf["map"], ds.MAP_DTYPE),
                              "position": np.asarray(buf["position"], np.float32)}
                    entry = writer.write_shard(root, name, arrays)
                    entries.append(entry)
                    _send(("shard", entry))
                    for v in buf.values():
                        v.clear()
    if pending_progress:
        _send(("frames", pending_progress))
    return entries
