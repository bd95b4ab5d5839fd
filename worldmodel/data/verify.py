"""`worldmodel data verify`: a dataset checked shard by shard against its manifest (format:
worldmodel/data/dataset.py), with a summary of what it holds (frames, maps, the mix of actions, how much of
each level the player positions cover)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from worldmodel.data.dataset import (SHARD_DIR, DatasetError, check_arrays, episode_runs, load_manifest, load_shard,
                                     run_bounds)
from worldmodel.game.action import TURN_MAX
from worldmodel.files import is_temp_file


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- verification ---------------------------------------------------------------------------------------
def verify_dataset(root: str | Path, checksums: bool = True, progress: bool = False) -> dict:
    """Check every shard against the manifest: the file exists, its size and sha256 match, it loads
    without pickle, its arrays have the right names, dtypes and shapes, its episodes, frame indices and
    maps match the manifest, its actions are valid encodings; across shards, every episode runs 0, 1, 2,
    ... without a gap or a duplicate and starts with the no-op action. Raises DatasetError naming the
    first bad shard; returns a summary dict (frames, episodes, maps, bytes, shards, frame_size,
    action_mix: share of frames per kind of action (see `action_counts`), coverage: per map, how much of
    its reachable area the player positions visit (`worldmodel.game.level.Level.coverage`), unlisted: files in
    shards/ that the manifest does not list, ignored)."""
    root = Path(root)
    manifest = load_manifest(root)
    frame_size = tuple(manifest["frame_size"])
    episodes: dict[int, list[tuple[int, int, str]]] = {}
    episode_map: dict[int, str] = {}
    map_frames: dict[str, int] = {}
    mix_counts: dict[str, int] = {}
    positions: dict[str, list[np.ndarray]] = {}
    shards = manifest["shards"]
    it = shards
    if progress:
        from worldmodel.progress import progress_bar
        it = progress_bar(shards, desc="verify", unit="shard")
    for s in it:
        name = s["name"]
        path = root / name
        if not path.is_file():
            raise DatasetError(f"{name}: shard file is missing")
        size = path.stat().st_size
        if size != s["bytes"]:
            raise DatasetError(f"{name}: {size} bytes on disk, the manifest says {s['bytes']} (truncated or replaced)")
        if checksums and sha256_file(path) != s["sha256"]:
            raise DatasetError(f"{name}: sha256 checksum does not match the manifest (corrupt or edited)")
        arrays = check_arrays(load_shard(root, name), name, frame_size)
        n = len(arrays["frames"])
        if n != s["frames"] or n == 0:
            raise DatasetError(f"{name}: holds {n} frames, the manifest says {s['frames']}")
        runs = episode_runs(arrays["episode"], arrays["frame_index"], name)
        if runs != s["episodes"]:
            raise DatasetError(f"{name}: episodes/frame indices do not match the manifest")
        if sorted(set(arrays["map"].tolist())) != sorted(s["maps"]):
            raise DatasetError(f"{name}: maps {sorted(set(arrays['map'].tolist()))} do not match the manifest {s['maps']}")
        _check_actions(arrays["actions"], name)
        for k, c in action_counts(arrays["actions"]).items():
            mix_counts[k] = mix_counts.get(k, 0) + c
        starts = arrays["frame_index"] == 0
        if starts.any() and np.any(arrays["actions"][starts] != 0):
            raise DatasetError(f"{name}: the first frame of an episode does not have the no-op action")
        for (ep, first, count), (a, b) in zip(runs, run_bounds(arrays["episode"])):
            maps_here = set(arrays["map"][a:b].tolist())
            if len(maps_here) != 1 or episode_map.setdefault(ep, next(iter(maps_here))) not in maps_here:
                raise DatasetError(f"{name}: episode {ep} changes map")
            episodes.setdefault(ep, []).append((first, count, name))
        for m, c in zip(*np.unique(arrays["map"], return_counts=True)):
            map_frames[str(m)] = map_frames.get(str(m), 0) + int(c)
            if "position" in arrays:
                positions.setdefault(str(m), []).append(arrays["position"][arrays["map"] == m])
    for ep, pieces in episodes.items():
        pieces.sort()
        expect = 0
        for first, count, name in pieces:
            if first != expect:
                what = "duplicated" if first < expect else "missing"
                raise DatasetError(f"{name}: episode {ep} has {what} frames (index {min(first, expect)} "
                                   f"follows {expect - 1})")
            expect = first + count
    listed = {Path(s["name"]).name for s in shards}
    shard_dir = root / SHARD_DIR
    unlisted = sorted(p.name for p in shard_dir.iterdir() if p.name not in listed and not is_temp_file(p.name)) \
        if shard_dir.is_dir() else []
    n_frames = sum(s["frames"] for s in shards)
    return {"frames": n_frames, "requested_frames": _requested_frames(root), "episodes": len(episodes),
            "shards": len(shards),
            "maps": dict(sorted(map_frames.items())), "bytes": sum(s["bytes"] for s in shards),
            "frame_size": list(frame_size), "fps": manifest["fps"], "wad": manifest.get("wad"),
            "action_mix": {k: c / max(1, n_frames) for k, c in mix_counts.items()},
            "coverage": _coverage(manifest.get("wad"), positions), "unlisted": unlisted}


def _coverage(wad: str | None, positions: dict[str, list[np.ndarray]]) -> dict[str, dict]:
    """Per map: the coverage of its reachable area by the frames' player positions (level.py)."""
    from worldmodel.game.level import load_level

    out = {}
    for m, chunks in sorted(positions.items()):
        level = load_level(wad or "freedoom2", m)
        out[m] = {**level.coverage(np.concatenate(chunks)), "visits": level.visits(np.concatenate(chunks)).tolist()}
    return out


def _requested_frames(root: Path) -> int | None:
    """The frames the dataset's `worldmodel collect` command asked for (collect.json), if it says."""
    try:
        return int(json.loads((root / "collect.json").read_text())["frames"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# what `action_counts` counts: name -> test on the encoded actions (N, ACTION_DIM): move, strafe, turn, attack, use
ACTION_KINDS = {
    "forward": lambda a: a[:, 0] > 0, "still": lambda a: a[:, 0] == 0, "backward": lambda a: a[:, 0] < 0,
    "straight back": lambda a: (a[:, 0] < 0) & (a[:, 1] == 0) & (a[:, 2] == 0),  # backing off, nothing else
    "strafe": lambda a: a[:, 1] != 0, "turn": lambda a: a[:, 2] != 0, "attack": lambda a: a[:, 3] > 0,
    "use": lambda a: a[:, 4] > 0,
}


def action_counts(actions: np.ndarray) -> dict[str, int]:
    """How many of the encoded actions (N, ACTION_DIM) walk forward / stand still / walk backward (move),
    back off straight (no strafe, no turn), strafe, turn, attack, use."""
    return {k: int(test(actions).sum()) for k, test in ACTION_KINDS.items()}


def _check_actions(actions: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(actions)):
        raise DatasetError(f"{name}: actions hold non-finite values")
    for col, field in ((0, "move"), (1, "strafe")):
        if not np.all(np.isin(actions[:, col], (-1.0, 0.0, 1.0))):
            raise DatasetError(f"{name}: actions[:, {col}] ({field}) must be -1, 0 or 1")
    if np.any(np.abs(actions[:, 2]) > 1.0):
        raise DatasetError(f"{name}: actions[:, 2] (turn / {TURN_MAX:g}) out of [-1, 1]")
    for col, field in ((3, "attack"), (4, "use")):
        if not np.all(np.isin(actions[:, col], (0.0, 1.0))):
            raise DatasetError(f"{name}: actions[:, {col}] ({field}) must be 0 or 1")
