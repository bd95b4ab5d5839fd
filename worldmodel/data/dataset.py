"""The gameplay dataset: shards + a manifest, their verification, and the training loaders.

Layout of a dataset directory:
    manifest.json        what the dataset holds (the source of truth for every reader)
    collect.json         the resolved `worldmodel collect` configuration (written by collect)
    shards/<name>.npz    the shards

A shard is a zip of .npy arrays (`np.load(path, allow_pickle=False)` reads it; deflate level 1, about
2.3x smaller than raw frames; no pickle anywhere), all with the same first dimension N:
    frames       uint8   [N, H, W, 3]   RGB, rendered and resized as `worldmodel.game.doom` does
    actions      float32 [N, 5]         `Action.to_vector()`: move, strafe, turn / TURN_MAX, attack, use
    episode      int64   [N]            episode id, unique within the dataset
    frame_index  int32   [N]            index of the frame within its episode (0, 1, 2, ...)
    map          <U8     [N]            map name, e.g. "MAP01"
    position     float32 [N, 3]         the player's x, y, angle after the frame's tic (optional)
Action convention: actions[i] is the action that PRODUCED frames[i] (the player held it during the tic
that ends on frames[i]). The first frame of an episode (frame_index 0) has the no-op action. A model
that predicts frame t from frames < t uses actions[t] (and earlier).

npz rather than safetensors: the shards compress (zip deflate), need no extra dependency, and still carry
no code (allow_pickle=False); safetensors is kept for the model weights, where mmap matters more.

Writes are atomic: a shard or the manifest is written to a temporary name in the same directory
(`.<name>.tmp-<pid>-<random>`), fsynced, then renamed over the final name; readers only look at what
the manifest lists, so a stray temporary file (a killed writer) is never read.

The manifest (format `worldmodel-dataset`, version 1): frame_size [H, W], fps, wad, action fields,
totals (frames, episodes, bytes, frames per map) and one entry per shard, sorted by name:
    {"name": "shards/ep000003-001.npz", "frames": 256, "bytes": ..., "sha256": ...,
     "episodes": [[episode, first_frame_index, count], ...], "maps": ["MAP04"]}
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from worldmodel.game.action import ACTION_DIM, FIELDS, TURN_MAX
from worldmodel.errors import UserError
from worldmodel.files import atomic_write_bytes, atomic_write_json, check_output_path, is_temp_file

FORMAT = "worldmodel-dataset"
VERSION = 1
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
FPS = 35
MAP_DTYPE = "<U8"
REQUIRED = {"frames": np.uint8, "actions": np.float32, "episode": np.int64, "frame_index": np.int32}
OPTIONAL = {"position": np.float32}
ACTION_CONVENTION = ("actions[i] is the action that produced frames[i]; the first frame of an episode "
                     "(frame_index 0) has the no-op action")


class DatasetError(UserError):
    """A missing, corrupt or inconsistent dataset; the message names the file at fault."""


# -- atomic writes ------------------------------------------------------------------------------------
def remove_temp_files(root: str | Path) -> int:
    """Delete temporary files left by killed writers under root (and root/shards); returns how many."""
    n = 0
    for d in (Path(root), Path(root) / SHARD_DIR):
        if d.is_dir():
            for p in d.iterdir():
                if is_temp_file(p.name):
                    try:
                        p.unlink()
                        n += 1
                    except OSError:
                        pass
    return n


# -- shards ---------------------------------------------------------------------------------------------
def encode_shard(arrays: dict) -> bytes:
    """dict of arrays -> npz bytes (deflate level 1), after checking names, dtypes and shapes."""
    arrays = _check_arrays(arrays, "<new shard>")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for name in sorted(arrays):
            # a fixed timestamp: the same arrays always give the same bytes (and the same sha256)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            for attr in ("compress_level", "_compresslevel"):  # Python >= 3.13 / older
                try:
                    setattr(info, attr, 1)
                    break
                except AttributeError:
                    pass
            with z.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arrays[name]), allow_pickle=False)
    return buf.getvalue()


def _check_arrays(arrays: dict, where: str, frame_size: Sequence[int] | None = None) -> dict:
    out = {}
    missing = [k for k in (*REQUIRED, "map") if k not in arrays]
    if missing:
        raise DatasetError(f"{where}: missing array(s) {missing}")
    unknown = set(arrays) - set(REQUIRED) - set(OPTIONAL) - {"map"}
    if unknown:
        raise DatasetError(f"{where}: unknown array(s) {sorted(unknown)}")
    n = len(arrays["frames"])
    for name, dtype in {**REQUIRED, **OPTIONAL}.items():
        if name not in arrays:
            continue
        a = np.asarray(arrays[name])
        if a.dtype != dtype:
            raise DatasetError(f"{where}: {name} has dtype {a.dtype}, expected {np.dtype(dtype)}")
        out[name] = a
    m = np.asarray(arrays["map"])
    if m.dtype.kind != "U":
        raise DatasetError(f"{where}: map has dtype {m.dtype}, expected a unicode string array")
    out["map"] = m.astype(MAP_DTYPE)
    f = out["frames"]
    if f.ndim != 4 or f.shape[3] != 3:
        raise DatasetError(f"{where}: frames have shape {f.shape}, expected [N, H, W, 3]")
    if frame_size is not None and tuple(f.shape[1:3]) != tuple(frame_size):
        raise DatasetError(f"{where}: frames are {f.shape[1]}x{f.shape[2]}, the dataset's frame size is "
                           f"{frame_size[0]}x{frame_size[1]}")
    shapes = {"actions": (n, ACTION_DIM), "episode": (n,), "frame_index": (n,), "map": (n,), "position": (n, 3)}
    for name, shape in shapes.items():
        if name in out and out[name].shape != shape:
            raise DatasetError(f"{where}: {name} has shape {out[name].shape}, expected {shape}")
    return out


def episode_runs(episode: np.ndarray, frame_index: np.ndarray, where: str = "<shard>") -> list[list[int]]:
    """[[episode, first_frame_index, count], ...] for consecutive frames of one episode; a DatasetError
    if frame indices do not increase by one inside a run."""
    runs: list[list[int]] = []
    n = len(episode)
    if n == 0:
        return runs
    cut = np.flatnonzero(np.diff(episode) != 0) + 1
    for a, b in zip(np.r_[0, cut], np.r_[cut, n]):
        fi = frame_index[a:b]
        if np.any(np.diff(fi) != 1):
            raise DatasetError(f"{where}: frame indices of episode {int(episode[a])} are not consecutive")
        runs.append([int(episode[a]), int(fi[0]), int(b - a)])
    return runs


def write_shard(root: str | Path, name: str, arrays: dict) -> dict:
    """Write a shard atomically under root and return its manifest entry. name: e.g. 'shards/x.npz'."""
    arrays = _check_arrays(arrays, name)
    data = encode_shard(arrays)
    atomic_write_bytes(Path(root) / name, data)
    return shard_entry(name, data, arrays)


def shard_entry(name: str, data: bytes, arrays: dict) -> dict:
    return {"name": name, "frames": int(len(arrays["frames"])), "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "episodes": episode_runs(arrays["episode"], arrays["frame_index"], name),
            "maps": sorted(set(arrays["map"].tolist()))}


def load_shard(root: str | Path, name: str) -> dict:
    """All arrays of a shard (decompressed). A DatasetError naming the shard, in its dataset folder (a
    trainer reads several), if it cannot be read."""
    path = Path(root) / name
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise DatasetError(f"{path}: shard file is missing") from None
    except Exception as e:  # zipfile.BadZipFile, ValueError, EOFError, zlib.error, ...
        raise DatasetError(f"{path}: cannot read shard ({type(e).__name__}: {e})") from None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- manifest -------------------------------------------------------------------------------------------
def new_manifest(frame_size: Sequence[int], wad: str = "freedoom2", fps: int = FPS) -> dict:
    return {"format": FORMAT, "version": VERSION, "frame_size": [int(frame_size[0]), int(frame_size[1])],
            "fps": int(fps), "wad": wad, "action_fields": list(FIELDS), "action_dim": ACTION_DIM,
            "turn_max": TURN_MAX, "action_convention": ACTION_CONVENTION, "shards": []}


def finalize_manifest(manifest: dict) -> dict:
    """Sort the shards by name and recompute the totals."""
    shards = sorted(manifest["shards"], key=lambda s: s["name"])
    names = [s["name"] for s in shards]
    if len(set(names)) != len(names):
        raise DatasetError("manifest.json: a shard is listed twice")
    maps: dict[str, int] = {}
    episodes = set()
    for s in shards:
        for ep, _, count in s["episodes"]:
            episodes.add(ep)
        if len(s["maps"]) == 1:
            maps[s["maps"][0]] = maps.get(s["maps"][0], 0) + s["frames"]
        else:  # a shard holding several maps: counted exactly when it is verified / loaded
            for m in s["maps"]:
                maps.setdefault(m, 0)
    manifest = dict(manifest, shards=shards)
    manifest.update(frames=sum(s["frames"] for s in shards), episodes=len(episodes),
                    bytes=sum(s["bytes"] for s in shards), maps=dict(sorted(maps.items())))
    return manifest


def write_manifest(root: str | Path, manifest: dict) -> dict:
    manifest = finalize_manifest(manifest)
    atomic_write_json(Path(root) / MANIFEST, manifest)
    return manifest


def load_manifest(root: str | Path) -> dict:
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset directory")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing (not a dataset, or a collection that has not written a shard)") from None
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read the manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatasetError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise DatasetError(f"{path}: format version {manifest.get('version')}, this code reads {VERSION}")
    for key in ("frame_size", "shards", "fps"):
        if key not in manifest:
            raise DatasetError(f"{path}: missing field {key!r}")
    for s in manifest["shards"]:
        for key in ("name", "frames", "bytes", "sha256", "episodes", "maps"):
            if key not in s:
                raise DatasetError(f"{path}: shard entry {s.get('name', '?')} lacks {key!r}")
        if Path(s["name"]).is_absolute() or ".." in Path(s["name"]).parts:
            raise DatasetError(f"{path}: shard name {s['name']!r} points outside the dataset")
    return manifest


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
        arrays = _check_arrays(load_shard(root, name), name, frame_size)
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
        for (ep, first, count), (a, b) in zip(runs, _run_bounds(arrays["episode"])):
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


# what `action_counts` counts: name -> (column of the action vector, test on it)
ACTION_KINDS = {
    "forward": (0, lambda v: v > 0), "still": (0, lambda v: v == 0), "backward": (0, lambda v: v < 0),
    "strafe": (1, lambda v: v != 0), "turn": (2, lambda v: v != 0), "attack": (3, lambda v: v > 0),
    "use": (4, lambda v: v > 0),
}


def action_counts(actions: np.ndarray) -> dict[str, int]:
    """How many of the encoded actions (N, ACTION_DIM) walk forward / stand still / walk backward (move),
    strafe, turn, attack, use."""
    return {k: int(test(actions[:, col]).sum()) for k, (col, test) in ACTION_KINDS.items()}


def _run_bounds(episode: np.ndarray) -> list[tuple[int, int]]:
    cut = np.flatnonzero(np.diff(episode) != 0) + 1
    return list(zip(np.r_[0, cut].tolist(), np.r_[cut, len(episode)].tolist()))


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


# -- reading for training ---------------------------------------------------------------------------------
class ShardCache:
    """Loads shards lazily, keeping the `size` most recently used ones in memory."""

    def __init__(self, root: str | Path, size: int = 8):
        self.root, self.size = Path(root), max(1, int(size))
        self._cache: OrderedDict[str, dict] = OrderedDict()
        self.loads = 0

    def get(self, name: str) -> dict:
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        arrays = load_shard(self.root, name)
        self.loads += 1
        self._cache[name] = arrays
        while len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return arrays

    def clear(self) -> None:
        self._cache.clear()

    def __getstate__(self):  # DataLoader workers get an empty cache, not a copy of the loaded shards
        return {"root": self.root, "size": self.size, "_cache": OrderedDict(), "loads": 0}


class ClipDataset:
    """Fixed-length clips of consecutive frames of one episode, for training.

    `ds[i]` -> {"frames": uint8 tensor [T,H,W,3], "actions": float32 tensor [T,5], "episode": int,
    "frame_index": int (of the first frame), "map": str}. Clips stream across shard boundaries (an
    episode is split over several shards) but never cross from one episode into another. The clip index
    is fixed by (manifest, clip_len, stride, maps): clip i starts `stride` frames after clip i-1 of the
    same episode. Shards are loaded lazily with an LRU cache of `cache_shards`, so the dataset need not
    fit in memory.

    Deterministic order for (resumable) training: `order(epoch)` is a permutation of the clips seeded by
    (seed, epoch) — shards are shuffled and clips are shuffled within windows of `shuffle_shards` shards,
    so that the cache is used well (None: one global shuffle); `indices(step, batch_size)` gives the clip
    indices of a training step, `sampler(batch_size, start_step)` a torch Sampler over that stream.
    maps: only episodes of these maps (e.g. maps.TRAIN_MAPS or maps.VAL_MAPS)."""

    def __init__(self, root: str | Path, clip_len: int, maps: Iterable[str] | None = None,
                 stride: int | None = None, seed: int = 0, cache_shards: int = 8,
                 shuffle_shards: int | None = 4):
        self.root = Path(root)
        self.manifest = load_manifest(self.root)
        self.frame_size = tuple(self.manifest["frame_size"])
        self.fps = self.manifest["fps"]
        self.clip_len = int(clip_len)
        if self.clip_len < 1:
            raise ValueError("clip_len must be >= 1")
        self.stride = int(stride or clip_len)
        if self.stride < 1:
            raise ValueError("stride must be >= 1")
        self.seed = int(seed)
        self.shuffle_shards = shuffle_shards
        self.maps = None if maps is None else sorted({m.upper() for m in maps})
        self.cache = ShardCache(self.root, cache_shards)
        self._build_index()

    def _build_index(self):
        shards = self.manifest["shards"]
        self.shard_names = [s["name"] for s in shards]
        # episode -> pieces (first_frame_index, shard_idx, offset_in_shard, count)
        pieces: dict[int, list[tuple[int, int, int, int]]] = {}
        ep_map: dict[int, str] = {}
        for si, s in enumerate(shards):
            off = 0
            for ep, first, count in s["episodes"]:
                pieces.setdefault(ep, []).append((first, si, off, count))
                if len(s["maps"]) == 1:
                    ep_map.setdefault(ep, s["maps"][0])
                off += count
        self.episodes: list[int] = []
        self.episode_pieces: list[np.ndarray] = []  # per episode: rows (first, shard, offset, count)
        self.episode_maps: list[str] = []
        clip_ep, clip_start = [], []
        for ep in sorted(pieces):
            m = ep_map.get(ep) or self._map_of(pieces[ep][0])
            if self.maps is not None and m not in self.maps:
                continue
            rows = np.array(sorted(pieces[ep]), dtype=np.int64)
            # keep the run of consecutive frames from the episode's start (verify guarantees all of it)
            ends = rows[:, 0] + rows[:, 3]
            ok = np.r_[True, rows[1:, 0] == ends[:-1]]
            rows = rows[:np.argmin(ok) if not ok.all() else len(rows)]
            length = int((rows[-1, 0] + rows[-1, 3]) - rows[0, 0]) if len(rows) else 0
            ei = len(self.episodes)
            self.episodes.append(ep)
            self.episode_pieces.append(rows)
            self.episode_maps.append(m)
            starts = np.arange(0, length - self.clip_len + 1, self.stride)
            clip_ep.append(np.full(len(starts), ei, dtype=np.int64))
            clip_start.append(starts.astype(np.int64))
        self.clip_episode = np.concatenate(clip_ep) if clip_ep else np.zeros(0, np.int64)
        self.clip_offset = np.concatenate(clip_start) if clip_start else np.zeros(0, np.int64)
        # the shard of each clip's first frame (for cache-friendly shuffling)
        self.clip_shard = np.zeros(len(self.clip_episode), dtype=np.int64)
        for i, (ei, off) in enumerate(zip(self.clip_episode.tolist(), self.clip_offset.tolist())):
            rows = self.episode_pieces[ei]
            k = int(np.searchsorted(rows[:, 0] - rows[0, 0], off, side="right") - 1)
            self.clip_shard[i] = rows[k, 1]
        self._orders: dict[int, np.ndarray] = {}

    def _map_of(self, piece) -> str:
        """The map of an episode piece that lies in a shard holding several maps."""
        _, si, off, _ = piece
        return str(self.cache.get(self.shard_names[si])["map"][off])

    def __len__(self) -> int:
        return len(self.clip_episode)

    @property
    def frames(self) -> int:
        """Frames in the episodes this dataset draws from."""
        return int(sum(int(r[:, 3].sum()) for r in self.episode_pieces))

    def clip(self, i: int) -> dict:
        return self[i]

    def __getitem__(self, i: int) -> dict:
        import torch

        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"clip {i} out of range ({len(self)} clips)")
        i %= len(self)
        ei, off = int(self.clip_episode[i]), int(self.clip_offset[i])
        rows = self.episode_pieces[ei]
        base = int(rows[0, 0])
        want_lo, want_hi = base + off, base + off + self.clip_len
        frames, actions, maps = [], [], []
        for first, si, soff, count in rows.tolist():
            lo, hi = max(first, want_lo), min(first + count, want_hi)
            if lo >= hi:
                continue
            shard = self.cache.get(self.shard_names[si])
            a, b = soff + (lo - first), soff + (hi - first)
            frames.append(shard["frames"][a:b])
            actions.append(shard["actions"][a:b])
            maps.append(shard["map"][a])
        return {"frames": torch.from_numpy(np.concatenate(frames)),
                "actions": torch.from_numpy(np.concatenate(actions).astype(np.float32, copy=False)),
                "episode": self.episodes[ei], "frame_index": want_lo, "map": str(maps[0])}

    # -- deterministic order ---------------------------------------------------------------------------
    def order(self, epoch: int) -> np.ndarray:
        """The permutation of clip indices for an epoch (seeded by (seed, epoch))."""
        epoch = int(epoch)
        if epoch in self._orders:
            return self._orders[epoch]
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, 0xC11F]))
        n = len(self)
        if not self.shuffle_shards:
            perm = rng.permutation(n)
        else:
            shard_ids = np.unique(self.clip_shard)
            shard_perm = rng.permutation(shard_ids)
            rank = np.empty(int(self.clip_shard.max()) + 1 if n else 0, dtype=np.int64)
            rank[shard_perm] = np.arange(len(shard_perm))
            window = rank[self.clip_shard] // int(self.shuffle_shards)
            perm = np.lexsort((rng.random(n), window))
        if len(self._orders) > 4:
            self._orders.pop(next(iter(self._orders)))
        self._orders[epoch] = perm
        return perm

    def indices(self, step: int, batch_size: int) -> list[int]:
        """Clip indices of training step `step` (0-based) in the endless stream epoch 0, epoch 1, ..."""
        n = len(self)
        if n == 0:
            raise DatasetError(f"{self.root}: no clip of {self.clip_len} frames in the selected maps")
        out = []
        for p in range(step * batch_size, (step + 1) * batch_size):
            out.append(int(self.order(p // n)[p % n]))
        return out

    def batch(self, step: int, batch_size: int) -> dict:
        """The batch of training step `step`: frames uint8 [B,T,H,W,3], actions float32 [B,T,5]."""
        import torch

        items = [self[i] for i in self.indices(step, batch_size)]
        return {"frames": torch.stack([x["frames"] for x in items]),
                "actions": torch.stack([x["actions"] for x in items]),
                "episode": [x["episode"] for x in items], "frame_index": [x["frame_index"] for x in items],
                "map": [x["map"] for x in items]}

    def sampler(self, batch_size: int, start_step: int = 0) -> "StepSampler":
        return StepSampler(self, batch_size, start_step)


class StepSampler:
    """An endless torch Sampler yielding `ClipDataset.indices(step, batch_size)` for step = start_step,
    start_step + 1, ...; use with `DataLoader(ds, batch_size=batch_size, sampler=...)`: batch k of the
    loader is training step start_step + k, so a resumed run sees exactly the data it would have seen."""

    def __init__(self, dataset: ClipDataset, batch_size: int, start_step: int = 0):
        self.dataset, self.batch_size, self.start_step = dataset, int(batch_size), int(start_step)

    def __iter__(self) -> Iterator[int]:
        step = self.start_step
        while True:
            yield from self.dataset.indices(step, self.batch_size)
            step += 1


def iter_shards(root: str | Path, maps: Iterable[str] | None = None, names: set[str] | None = None) -> Iterator[dict]:
    """Every shard's arrays in manifest order (with "name"), restricted to frames of `maps` and to the
    shards in `names` if given."""
    manifest = load_manifest(root)
    keep = None if maps is None else {m.upper() for m in maps}
    for s in manifest["shards"]:
        if (keep is not None and not keep.intersection(s["maps"])) or (names is not None and s["name"] not in names):
            continue
        arrays = load_shard(root, s["name"])
        if keep is not None and not set(s["maps"]) <= keep:
            mask = np.isin(arrays["map"], sorted(keep))
            arrays = {k: v[mask] for k, v in arrays.items()}
        arrays["name"] = s["name"]
        yield arrays


def iter_frames(root: str | Path, batch_size: int = 256, maps: Iterable[str] | None = None,
                with_info: bool = False) -> Iterator:
    """All frames of a dataset in order, as uint8 torch tensors [B,H,W,3] (the last batch may be
    smaller) — for autoencoder training or pre-encoding latents. with_info: yield (frames, info) where
    info holds the matching actions, episode, frame_index and map arrays."""
    import torch

    buf: list[dict] = []
    have = 0

    def emit(chunks):
        frames = torch.from_numpy(np.concatenate([c["frames"] for c in chunks]))
        if not with_info:
            return frames
        info = {k: np.concatenate([c[k] for c in chunks]) for k in ("actions", "episode", "frame_index", "map")}
        return frames, info

    for arrays in iter_shards(root, maps):
        start = 0
        n = len(arrays["frames"])
        while start < n:
            take = min(batch_size - have, n - start)
            buf.append({k: v[start:start + take] for k, v in arrays.items() if k != "name"})
            have += take
            start += take
            if have == batch_size:
                yield emit(buf)
                buf, have = [], 0
    if have:
        yield emit(buf)


# -- preview ------------------------------------------------------------------------------------------------
def preview_grid(root: str | Path, n: int = 48, cols: int = 8, seed: int = 0) -> np.ndarray:
    """A uint8 RGB image of n frames drawn evenly across the dataset's shards (one per shard first)."""
    manifest = load_manifest(root)
    shards = manifest["shards"]
    if not shards:
        raise DatasetError(f"{root}: the dataset holds no shard")
    rng = np.random.default_rng(seed)
    picks = np.linspace(0, len(shards) - 1, num=min(n, len(shards))).round().astype(int).tolist()
    while len(picks) < n:
        picks.append(int(rng.integers(len(shards))))
    tiles = []
    cache = ShardCache(root, 2)
    for si in sorted(picks):
        arrays = cache.get(shards[si]["name"])
        tiles.append(arrays["frames"][int(rng.integers(len(arrays["frames"])))])
    h, w = tiles[0].shape[:2]
    rows = math.ceil(len(tiles) / cols)
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for j, t in enumerate(tiles):
        grid[(j // cols) * h:(j // cols + 1) * h, (j % cols) * w:(j % cols + 1) * w] = t
    return grid


# -- CLI: worldmodel data ... ----------------------------------------------------------------------------
def export_start_clips(root: str | Path, out: str | Path, count: int, frames: int, maps: Iterable[str] | None = None,
                       skip: int = 70) -> list[Path]:
    """Write `count` start clips of `frames` consecutive frames each (from different episodes, `skip`
    frames into the shard so the scene is under way) as `out/clipNN.npz` with `frames` uint8
    (N, H, W, 3) and `actions` float32 (N, 5): the start scenes a checkpoint ships so that playing
    needs no dataset. Where the shards hold player positions, the clips are spread over the places
    the data went (farthest-point sampling over the clips' positions, per map in turn), so that a
    level model's start scenes show the whole level; otherwise the first episodes are taken."""
    keep = None if maps is None else {m.upper() for m in maps}
    cands = []  # (shard name, first row, map, x, y): one clip per episode
    seen_episodes: set[int] = set()
    for s in load_manifest(root)["shards"]:
        if keep is not None and not keep.intersection(s["maps"]):
            continue
        try:
            with np.load(Path(root) / s["name"], allow_pickle=False) as z:  # the small arrays only
                small = {k: z[k] for k in ("episode", "map", "position") if k + ".npy" in z.zip.namelist()}
        except (OSError, ValueError) as e:
            raise DatasetError(f"{s['name']}: unreadable shard ({e})") from None
        for start, end in _run_bounds(small["episode"]):
            ep = int(small["episode"][start])
            m = str(small["map"][start])
            if ep in seen_episodes or end - start < skip + frames or (keep is not None and m not in keep):
                continue
            seen_episodes.add(ep)
            xy = small["position"][start + skip, :2] if "position" in small else (np.nan, np.nan)
            cands.append((s["name"], start + skip, m, float(xy[0]), float(xy[1])))
            if "position" not in small and len(cands) == count:
                break
        if "position" not in small and len(cands) == count:
            break
    if len(cands) < count:
        raise DatasetError(f"{root}: found only {len(cands)} episodes with {skip + frames} frames for start clips")
    picked = _spread(cands, count) if all(np.isfinite(c[3]) for c in cands) else cands[:count]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, first, _, _, _ in picked:
        arrays = load_shard(root, name)
        sl = slice(first, first + frames)
        path = out / f"clip{len(written):02d}.npz"
        buf = io.BytesIO()
        np.savez_compressed(buf, frames=arrays["frames"][sl], actions=arrays["actions"][sl].astype(np.float32))
        atomic_write_bytes(path, buf.getvalue())
        written.append(path)
    return written


def _spread(cands: list[tuple], count: int) -> list[tuple]:
    """`count` candidates (name, row, map, x, y), maps in turn, each map's far apart (farthest point)."""
    by_map: dict[str, list[tuple]] = {}
    for c in cands:
        by_map.setdefault(c[2], []).append(c)
    order = sorted(by_map)
    chosen: dict[str, list[int]] = {m: [] for m in order}
    out = []
    while len(out) < count:
        for m in order:
            group = by_map[m]
            if len(out) == count or len(chosen[m]) == len(group):
                continue
            xy = np.array([(c[3], c[4]) for c in group])
            if not chosen[m]:  # the candidate nearest the middle of the map's data first
                i = int(np.argmin(np.linalg.norm(xy - np.median(xy, 0), axis=1)))
            else:
                d = np.min(np.linalg.norm(xy[:, None] - xy[chosen[m]][None], axis=2), axis=1)
                i = int(np.argmax(d))
            chosen[m].append(i)
            out.append(group[i])
    return out


def _save_coverage_maps(summary: dict, path: str | Path) -> None:
    """One picture per map side by side: frames per 64-unit cell (`level.coverage_map`), enlarged."""
    import cv2

    from worldmodel.game.level import coverage_map, load_level

    tiles = []
    for m, c in summary["coverage"].items():
        tile = coverage_map(load_level(summary.get("wad") or "freedoom2", m), np.asarray(c["visits"]))
        tile = np.repeat(np.repeat(tile, 8, 0), 8, 1)
        cv2.putText(tile, m, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 0), 1)
        tiles.append(tile)
    if not tiles:
        raise UserError("no player positions in this dataset: nothing to draw")
    h = max(t.shape[0] for t in tiles)
    grid = np.concatenate([np.pad(t, ((0, h - t.shape[0]), (0, 4), (0, 0))) for t in tiles], axis=1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR)):
        raise UserError(f"{path}: cannot write the image")
    print(f"wrote {path}")


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    v = sub.add_parser("verify", help="check every shard of a dataset against its manifest",
                       description="Check every shard of a dataset against its manifest (size, sha256, "
                                   "arrays, episodes); exit 2 naming the first bad shard, or for a dataset with no "
                                   "frame; exit 1 for an incomplete collection (fewer frames than its collect "
                                   "command asked for: run it again to finish).")
    v.add_argument("dir", help="dataset directory (holds manifest.json)")
    v.add_argument("--no-checksum", action="store_true", help="skip the sha256 checksums (faster)")
    v.add_argument("--json", action="store_true", help="print the summary as JSON")
    v.add_argument("--coverage-map", default=None, metavar="PNG",
                   help="also draw each map's coverage (frames per cell, north up; red: reachable, never visited)")
    p = sub.add_parser("preview", help="save a PNG grid of frames drawn across a dataset")
    p.add_argument("dir", help="dataset directory")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("-n", type=int, default=48, help="number of frames (default 48)")
    p.add_argument("--cols", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=1, help="enlarge each frame by this factor")
    c = sub.add_parser("start-clips", help="export start scenes for a checkpoint folder (start_clips/*.npz)")
    c.add_argument("dir", help="dataset directory")
    c.add_argument("--out", required=True, help="folder to write clipNN.npz into, e.g. checkpoints/NAME/start_clips")
    c.add_argument("--count", type=int, default=4, help="number of clips, each from another episode (default 4)")
    c.add_argument("--frames", type=int, default=8, help="frames per clip (default 8: the tiny model's cache)")
    c.add_argument("--maps", default=None, help="maps to draw from, e.g. MAP01-MAP05 (default: all)")
    parser.set_defaults(_data_parser=parser)


def run(args) -> int:
    if args.data_command == "verify":
        if args.coverage_map:

            check_output_path(args.coverage_map, "--coverage-map")  # before the whole dataset is read
        summary = verify_dataset(args.dir, checksums=not args.no_checksum, progress=sys.stderr.isatty())
        if not summary["frames"]:
            raise DatasetError(f"{args.dir}: the dataset holds no frames (a collection that has not written a shard?)")
        want = summary["requested_frames"]
        incomplete = want is not None and summary["frames"] < want
        if args.json:
            print(json.dumps(summary, indent=1))
            return 1 if incomplete else 0
        h, w = summary["frame_size"]
        hours = summary["frames"] / summary["fps"] / 3600
        status = f"INCOMPLETE ({summary['frames']} of the {want} frames collected)" if incomplete else "OK"
        print(f"{args.dir}: {status} — {summary['frames']} frames ({hours:.2f} h at {summary['fps']} fps), "
              f"{summary['episodes']} episodes, {summary['shards']} shards, {h}x{w}, "
              f"{_human_bytes(summary['bytes'])}")
        print("maps: " + ", ".join(f"{m} {c}" for m, c in summary["maps"].items()))
        print("actions (share of frames): " + ", ".join(f"{k} {v:.1%}" for k, v in summary["action_mix"].items()))
        for m, c in summary["coverage"].items():
            print(f"coverage of {m} ({c['cells']} reachable cells of {c['cell_size']}x{c['cell_size']} map units): "
                  f"visited {c['visited']:.1%}, well covered (a tenth of the mean or more) {c['well_covered']:.1%}, "
                  f"evenness {c['evenness']:.2f}, frames outside {c['outside']:.1%}")
        if args.coverage_map:
            _save_coverage_maps(summary, args.coverage_map)
        if summary["unlisted"]:
            print(f"note: {len(summary['unlisted'])} file(s) in {SHARD_DIR}/ are not in the manifest and were "
                  f"ignored (e.g. {summary['unlisted'][0]})")
        if incomplete:
            print(f"worldmodel data verify: {args.dir} is an incomplete collection ({summary['frames']} of {want} "
                  f"frames): the shards are sound; run its `worldmodel collect` command again to finish it",
                  file=sys.stderr)
            return 1
        return 0
    if args.data_command == "preview":
        import cv2


        check_output_path(args.out)
        grid = preview_grid(args.dir, n=args.n, cols=args.cols, seed=args.seed)
        if args.scale > 1:
            grid = np.repeat(np.repeat(grid, args.scale, 0), args.scale, 1)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(args.out), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR)):
            raise UserError(f"{args.out}: cannot write the image")
        print(f"wrote {args.out}")
        return 0
    if args.data_command == "start-clips":
        from worldmodel.game.maps import parse_maps

        check_output_path(args.out, folder=True)
        paths = export_start_clips(args.dir, args.out, args.count, args.frames,
                                   parse_maps(args.maps) if args.maps else None)
        print(f"wrote {len(paths)} start clips to {args.out}")
        return 0
    args._data_parser.print_help()
    return 2
