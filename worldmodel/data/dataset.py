"""The gameplay dataset: its format (shards + a manifest) and the readers (the training loaders). Written by
worldmodel/data/writer.py, checked by verify.py, `worldmodel data` in tools.py.

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

import json
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from worldmodel.game.action import ACTION_DIM
from worldmodel.errors import UserError

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


# -- shards ---------------------------------------------------------------------------------------------
def check_arrays(arrays: dict, where: str, frame_size: Sequence[int] | None = None) -> dict:
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


def run_bounds(episode: np.ndarray) -> list[tuple[int, int]]:
    cut = np.flatnonzero(np.diff(episode) != 0) + 1
    return list(zip(np.r_[0, cut].tolist(), np.r_[cut, len(episode)].tolist()))


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


# -- manifest -------------------------------------------------------------------------------------------
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
