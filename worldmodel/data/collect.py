"""`worldmodel collect`: play the real game with the exploration policy and record a dataset.

The work is cut into deterministic units so that an interrupted collection (Ctrl-C, kill -9, a crash)
is completed by re-running the same command, with no duplicate and no missing frame:
- unit k is one episode: map `maps[k % len(maps)]`, seed `unit_seed(seed, k)` (for the engine, the
  policy and the warm-up), `episode_frames` frames (the last unit fewer, so that the total is --frames);
- with `--starts level` (a level model's data: one map, covered everywhere) the player is first warped
  to a start cell of the level drawn by the unit's seed (`worldmodel.game.level`: never one of the level's
  evaluation start places) and turned to a random heading, and the engine seed is a training seed
  (even); with `--split val` as well, the units are the level's held-out episodes instead: its
  evaluation start places in turn, evaluation seeds (odd);
- before recording, the policy plays a seeded number of warm-up tics (0..warmup_frames) so that
  episodes do not all start at the same place; frame 0 of an episode is produced by a no-op tic;
- an episode is written as shards of `shard_frames` frames: shards/ep<k:06d>-<part:04d>.npz.
Each shard is written atomically and recorded in manifest.json (also atomic). On a re-run, finished
shards are skipped, shard files that made it to disk but not into the manifest are checked and adopted,
temporary files of killed writers are deleted, and a unit with missing parts is replayed from its start
(the game is deterministic) writing only the missing parts. Shard bytes are deterministic, so an
interrupted-and-resumed collection is byte-identical to an uninterrupted one.

If the player leaves the level (an exit), the game restarts the map and the rest of the unit is a new
episode: episode id `k + segment * SEGMENT_STRIDE` (segment 0 is plain k).

Only training maps (freedoom2 MAP01-MAP20) are accepted; `--split val` collects validation data from
MAP21-MAP24 only (for validation losses). Held-out maps are always refused.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import multiprocessing as mp
import multiprocessing.util
import os
import queue as queue_mod
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from worldmodel.data import dataset as ds
from worldmodel.files import atomic_write_json, check_output_path
from worldmodel.errors import UserError, sigterm_unwinds
from worldmodel.game.maps import TRAIN_MAPS, VAL_MAPS, HeldOutMapError, add_wad_argument, check_map, parse_maps, split_of

SEGMENT_STRIDE = 1_000_000_000
CONFIG = "collect.json"
LOCK = ".collect.lock"
# settings that must be the same to add to an existing dataset (frames may grow, workers may change)
FIXED_KEYS = ("format", "wad", "split", "maps", "frame_size", "seed", "episode_frames", "shard_frames",
              "warmup_frames", "skill", "policy", "starts")
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


def _init_worker(q, parent: int):
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
        policy = ExplorerPolicy(unit.seed)
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
                    entry = ds.write_shard(root, name, arrays)
                    entries.append(entry)
                    _send(("shard", entry))
                    for v in buf.values():
                        v.clear()
    if pending_progress:
        _send(("frames", pending_progress))
    return entries


# -- the main process --------------------------------------------------------------------------------------
def _adopt(root: Path, unit: Unit, part: int) -> dict | None:
    """A shard file on disk that the manifest does not list (killed between rename and manifest write):
    its entry if it is complete and what the plan expects there, else None (and the file is removed)."""
    _, start, count, name = unit.parts[part]
    path = root / name
    try:
        arrays = ds._check_arrays(ds.load_shard(root, name), name)
        ok = (len(arrays["frames"]) == count and np.all(arrays["map"] == unit.map)
              and np.all(arrays["episode"] % SEGMENT_STRIDE == unit.k))
        if ok:
            return ds.shard_entry(name, path.read_bytes(), arrays)
    except ds.DatasetError:
        pass
    path.unlink(missing_ok=True)
    return None


class _Lock:
    def __init__(self, root: Path):
        self.path = root / LOCK

    def __enter__(self):
        self.f = open(self.path, "w")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.f.close()
            raise UserError(f"{self.path.parent}: another `worldmodel collect` is writing to this dataset") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def collect(cfg: CollectConfig, out: str | Path, workers: int | None = None, progress: bool = True) -> dict:
    """Collect (or complete) the dataset described by cfg in `out`; returns a summary dict."""
    root = check_output_path(out, folder=True).absolute()
    root.mkdir(parents=True, exist_ok=True)
    (root / ds.SHARD_DIR).mkdir(exist_ok=True)
    with _Lock(root), sigterm_unwinds():  # `kill PID` cleans up like Ctrl-C
        return _collect_locked(cfg, root, workers, progress)


def _collect_locked(cfg: CollectConfig, root: Path, workers, progress) -> dict:
    conf = asdict(cfg)
    conf_path = root / CONFIG
    manifest_path = root / ds.MANIFEST
    if conf_path.exists():
        try:
            old = json.loads(conf_path.read_text())
        except ValueError as e:
            raise UserError(f"{conf_path}: unreadable ({e})") from None
        old.setdefault("starts", "map")  # datasets from before --starts
        diff = [k for k in FIXED_KEYS if old.get(k) != conf.get(k)]
        if diff:
            what = "; ".join(f"{k}: dataset {old.get(k)!r}, now {conf.get(k)!r}" for k in diff)
            raise UserError(f"{root} was collected with other settings ({what}); use a new --out directory")
    elif manifest_path.exists():
        raise UserError(f"{root} holds a dataset that `worldmodel collect` did not make ({CONFIG} is missing)")
    removed = ds.remove_temp_files(root)

    manifest = ds.load_manifest(root) if manifest_path.exists() else ds.new_manifest(cfg.frame_size, cfg.wad)
    if list(manifest["frame_size"]) != list(cfg.frame_size):
        raise UserError(f"{root} holds {manifest['frame_size']} frames, not {cfg.frame_size}")
    units = plan(cfg)
    expected = {name: (u, p, c) for u in units for p, _, c, name in u.parts}
    have = {s["name"]: s for s in manifest["shards"]}
    extra = [n for n in have if n not in expected]
    if extra:
        total = sum(s["frames"] for s in manifest["shards"])
        raise UserError(f"{root} already holds {total} frames, more than --frames {cfg.frames} "
                        f"(e.g. {extra[0]}); use a larger --frames or a new --out directory")
    done: dict[str, dict] = {}
    for name, s in have.items():
        u, p, c = expected[name]
        path = root / name
        if s["frames"] == c and path.is_file() and path.stat().st_size == s["bytes"]:
            done[name] = s
    for name, (u, p, c) in expected.items():  # shards on disk that the manifest missed
        if name not in done and (root / name).is_file():
            entry = _adopt(root, u, p) if name not in have else None
            if entry is None:
                (root / name).unlink(missing_ok=True)
            else:
                done[name] = entry
    manifest["shards"] = list(done.values())
    manifest = ds.write_manifest(root, manifest)
    atomic_write_json(root / CONFIG, conf)

    tasks = []
    for u in units:
        needed = [p for p, _, _, name in u.parts if name not in done]
        if needed:
            tasks.append((u, needed))
    todo = sum(u.parts[p][2] for u, needed in tasks for p in needed)
    have_frames = manifest["frames"]
    if removed or done:
        print(f"resuming: {have_frames} frames in {len(done)} shards already collected"
              + (f", {removed} stale temporary file(s) removed" if removed else ""), file=sys.stderr)
    t0 = time.time()
    if tasks:
        workers = (os.cpu_count() or 1) if workers is None else int(workers)
        workers = min(workers, len(tasks))
        _run_tasks(cfg, root, tasks, workers, todo, manifest, done, progress)
    elapsed = time.time() - t0
    manifest = ds.write_manifest(root, dict(manifest, shards=list(done.values())))
    return {"frames": manifest["frames"], "new_frames": todo, "seconds": elapsed,
            "fps": todo / elapsed if elapsed > 0 and todo else 0.0, "shards": len(manifest["shards"]),
            "episodes": manifest["episodes"], "dir": str(root)}


def _stop_pool(pool, wait: float = 5.0) -> None:
    """pool.terminate(), without hanging: CPython's Pool.terminate can wait for ever on a worker that its
    maintenance thread started meanwhile (never signalled, blocked on a queue lock the main process
    holds). Workers get SIGTERM (a playing one closes its game); any left after `wait` s get SIGKILL."""
    stopper = threading.Thread(target=pool.terminate, daemon=True)
    stopper.start()
    stopper.join(wait)
    for signal_them in ("terminate", "kill"):
        if not stopper.is_alive():
            return
        for p in multiprocessing.active_children():
            getattr(p, signal_them)()
        stopper.join(wait)


def _run_tasks(cfg, root, tasks, workers, todo, manifest, done, progress):
    from worldmodel.progress import progress_bar

    conf = asdict(cfg)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    bar = progress_bar(total=todo, unit="frame", unit_scale=True, desc="collect", disable=not progress,
                       smoothing=0.1)
    last_write = time.time()
    dirty = False

    def add(entry):
        nonlocal dirty
        if entry["name"] not in done or done[entry["name"]] != entry:
            done[entry["name"]] = entry
            dirty = True

    def drain(timeout):
        try:
            msg = q.get(timeout=timeout)
        except queue_mod.Empty:
            return
        while True:
            kind, val = msg
            if kind == "frames":
                bar.update(val)
            elif kind == "shard":
                add(val)
            try:
                msg = q.get_nowait()
            except queue_mod.Empty:
                return

    def save_manifest(failing: bool = False) -> None:
        try:
            ds.write_manifest(root, dict(manifest, shards=list(done.values())))
        except (OSError, UserError):
            if not failing:  # on the way out of an error (a full disk) that error is the one to tell: the
                raise        # shards on disk that the manifest misses are adopted by the next run
        finally:
            bar.close()

    if workers <= 0:  # in this process, one unit after the other (debugging, tests)
        try:
            for u, needed in tasks:
                for entry in run_unit(conf, u, needed, str(root)):
                    add(entry)
                    bar.update(entry["frames"])
                ds.write_manifest(root, dict(manifest, shards=list(done.values())))
        except BaseException:
            save_manifest(failing=True)
            raise
        save_manifest()
        return
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(q, os.getpid()))
    try:
        pending = [pool.apply_async(run_unit, (conf, u, needed, str(root))) for u, needed in tasks]
        while pending:
            drain(0.2)
            still = []
            for r in pending:
                if r.ready():
                    for entry in r.get():  # re-raises a worker's exception
                        add(entry)
                else:
                    still.append(r)
            pending = still
            if dirty and time.time() - last_write > 1.0:
                ds.write_manifest(root, dict(manifest, shards=list(done.values())))
                last_write, dirty = time.time(), False
        drain(0.05)
        pool.close()
        pool.join()
    except BaseException:
        _stop_pool(pool)
        save_manifest(failing=True)
        raise
    save_manifest()


# -- CLI ---------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, required=True, help="total frames to collect")
    parser.add_argument("--out", required=True, help="dataset directory (created; re-run to resume)")
    parser.add_argument("--maps", default=None,
                        help="maps, e.g. MAP01,MAP02 or MAP01-MAP05 (default: all maps of the split: "
                             "MAP01-MAP20 for train, MAP21-MAP24 for val)")
    parser.add_argument("--split", choices=("train", "val"), default="train",
                        help="train: training maps only (default); val: validation maps MAP21-MAP24 only "
                             "(with --starts level: the level's held-out episodes)")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes (default: CPU count; 0: play in this process)")
    parser.add_argument("--frame-size", default="96x128", help="HxW of stored frames (default 96x128)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--episode-frames", type=int, default=1024,
                        help="frames per episode (default 1024, about 29 s of play)")
    parser.add_argument("--shard-frames", type=int, default=256, help="frames per shard (default 256)")
    parser.add_argument("--warmup-frames", type=int, default=512,
                        help="at most this many unrecorded tics of play before an episode starts, so that "
                             "episodes do not all start at the map's start (default 512)")
    parser.add_argument("--skill", type=int, default=3, help="Doom skill 1-5 (default 3)")
    add_wad_argument(parser, "; a user's maps are theirs to train on (with --starts level: a level model of one)")
    parser.add_argument("--starts", choices=STARTS, default="map",
                        help="where episodes start: map = the map's player start (default); level = start "
                             "cells all over one map, for a level model (never its evaluation start places)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args) -> CollectConfig:
    from worldmodel.game.doom import parse_frame_size

    try:
        maps = parse_maps(args.maps) if args.maps else list(TRAIN_MAPS if args.split == "train" else VAL_MAPS)
    except ValueError as e:
        raise UserError(str(e)) from None
    if not 1 <= args.skill <= 5:
        raise UserError("--skill must be 1-5")
    return CollectConfig(frames=args.frames, maps=[m.upper() for m in maps], split=args.split, wad=args.wad,
                         frame_size=list(parse_frame_size(args.frame_size)), seed=args.seed,
                         episode_frames=args.episode_frames, shard_frames=args.shard_frames,
                         warmup_frames=args.warmup_frames, skill=args.skill, starts=args.starts)


def run(args) -> int:
    cfg = config_from_args(args)
    if args.workers is not None and args.workers < 0:
        raise UserError("--workers must be >= 0")
    s = collect(cfg, args.out, workers=args.workers, progress=not args.no_progress)
    if s["new_frames"]:
        print(f"collected {s['new_frames']} frames in {s['seconds']:.1f} s ({s['fps']:.0f} frames/s); "
              f"{s['dir']} holds {s['frames']} frames, {s['episodes']} episodes, {s['shards']} shards")
    else:
        print(f"{s['dir']} is complete: {s['frames']} frames, {s['episodes']} episodes, {s['shards']} shards")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m worldmodel.data.collect ...`: the same as `worldmodel collect ...`."""
    parser = argparse.ArgumentParser(prog="worldmodel collect", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("\nworldmodel collect: interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, OSError) as e:
        print(f"worldmodel collect: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
