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
import multiprocessing as mp
import os
import queue as queue_mod
import sys
import threading
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np

from worldmodel.data import dataset as ds
from worldmodel.data import writer
from worldmodel.data.units import SEGMENT_STRIDE, STARTS, CollectConfig, Unit, init_worker, plan, run_unit
from worldmodel.files import atomic_write_json, check_output_path
from worldmodel.errors import UserError, sigterm_unwinds
from worldmodel.game.maps import TRAIN_MAPS, VAL_MAPS, add_wad_argument, parse_maps

CONFIG = "collect.json"
LOCK = ".collect.lock"
# settings that must be the same to add to an existing dataset (frames may grow, workers may change)
FIXED_KEYS = ("format", "wad", "split", "maps", "frame_size", "seed", "episode_frames", "shard_frames",
              "warmup_frames", "skill", "policy", "starts", "straight_back")
# a setting added later (--starts, --straight-back) reads as its default in a dataset collected before it
ADDED_LATER = {f.name: f.default for f in fields(CollectConfig) if f.name in ("starts", "straight_back")}


# -- the main process --------------------------------------------------------------------------------------
def _adopt(root: Path, unit: Unit, part: int) -> dict | None:
    """A shard file on disk that the manifest does not list (killed between rename and manifest write):
    its entry if it is complete and what the plan expects there, else None (and the file is removed)."""
    _, start, count, name = unit.parts[part]
    path = root / name
    try:
        arrays = ds.check_arrays(ds.load_shard(root, name), name)
        ok = (len(arrays["frames"]) == count and np.all(arrays["map"] == unit.map)
              and np.all(arrays["episode"] % SEGMENT_STRIDE == unit.k))
        if ok:
            return writer.shard_entry(name, path.read_bytes(), arrays)
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
        old = {**ADDED_LATER, **old}
        diff = [k for k in FIXED_KEYS if old.get(k) != conf.get(k)]
        if diff:
            what = "; ".join(f"{k}: dataset {old.get(k)!r}, now {conf.get(k)!r}" for k in diff)
            raise UserError(f"{root} was collected with other settings ({what}); use a new --out directory")
    elif manifest_path.exists():
        raise UserError(f"{root} holds a dataset that `worldmodel collect` did not make ({CONFIG} is missing)")
    removed = writer.remove_temp_files(root)

    manifest = ds.load_manifest(root) if manifest_path.exists() else writer.new_manifest(cfg.frame_size, cfg.wad)
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
    manifest = writer.write_manifest(root, manifest)
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
    manifest = writer.write_manifest(root, dict(manifest, shards=list(done.values())))
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
        for p in mp.active_children():
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
            writer.write_manifest(root, dict(manifest, shards=list(done.values())))
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
                writer.write_manifest(root, dict(manifest, shards=list(done.values())))
        except BaseException:
            save_manifest(failing=True)
            raise
        save_manifest()
        return
    pool = ctx.Pool(workers, initializer=init_worker, initargs=(q, os.getpid()))
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
                writer.write_manifest(root, dict(manifest, shards=list(done.values())))
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
    parser.add_argument("--straight-back", type=float, default=0.0, metavar="P",
                        help="share of the policy's backward holds that back off straight, mouse at rest "
                             "(default 0: the explorer as the evaluation plays it); more data for the "
                             "model to learn backing off")
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
                         warmup_frames=args.warmup_frames, skill=args.skill, starts=args.starts,
                         straight_back=args.straight_back)


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
