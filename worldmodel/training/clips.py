"""Training data as clips: frames of a dataset's maps (the split's maps only: held-out maps are never
read), clips of consecutive frames of one episode, and their latents under the frozen autoencoder --
encoded once and cached in the run folder (`prepare_latents`), or at every step (`OnlineClips`)."""
from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from worldmodel.errors import UserError
from worldmodel.model.autoencoder import Autoencoder
from worldmodel.model.checkpoint import CheckpointError, load_tensors, save_tensors
from worldmodel.progress import progress_bar
from worldmodel.training.steps import batch_indices, rank0_flag

READ_SPREAD = 4  # read_frames with max_frames: read this many times more frames than kept, from spread shards


class _Clips:
    """Clips of `clip_frames` consecutive rows of tensors stored back to back; `starts` (M,) int64
    holds the first row of each clip."""
    starts: torch.Tensor
    clip_frames: int

    def __len__(self) -> int:
        return len(self.starts)

    def rows(self, idx) -> torch.Tensor:
        """The rows (B, clip_frames) of the clips `idx`."""
        return self.starts[torch.as_tensor(idx)].reshape(-1, 1) + torch.arange(self.clip_frames)


@dataclass
class FrameClips(_Clips):
    """Clips of real frames: all frames back to back, `starts` the first frame of each clip."""
    frames: torch.Tensor  # (N, H, W, 3) uint8
    actions: torch.Tensor  # (N, A) float32, actions[i] produced frames[i]
    starts: torch.Tensor  # (M,) int64
    clip_frames: int
    maps: list[str] = field(default_factory=list)

    def clip(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows(idx)
        return self.frames[rows], self.actions[rows]  # (B, F, H, W, 3), (B, F, A)


@dataclass
class LatentClips(_Clips):
    """Clips of cached latents: the same layout as FrameClips."""
    latents: torch.Tensor  # (N, C, h, w), stored float16
    actions: torch.Tensor  # (N, A) float32
    starts: torch.Tensor  # (M,) int64
    clip_frames: int
    maps: list[str] = field(default_factory=list)

    def clip(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows(idx)
        return self.latents[rows].float(), self.actions[rows]  # (B, F, C, h, w), (B, F, A)

    @property
    def frames(self) -> int:
        """Distinct frames the clips are cut from."""
        return len(self.latents)

    def batch(self, step: int, batch: int, lo: int, hi: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice [lo:hi] of the global batch of `step` (see `batch_indices`)."""
        return self.clip(batch_indices(step, batch, len(self), seed)[lo:hi])

    def with_clip_frames(self, clip_frames: int) -> "LatentClips":
        """The same frames cut into clips of another length (each longer clip is split)."""
        if clip_frames > self.clip_frames:
            raise UserError(f"clips of {self.clip_frames} frames cannot give clips of {clip_frames}")
        per = self.clip_frames // clip_frames
        starts = (self.starts[:, None] + torch.arange(per) * clip_frames).flatten()
        return LatentClips(self.latents, self.actions, starts, clip_frames, self.maps)

    def save(self, path: Path, meta: dict) -> None:
        save_tensors(path, {"latents": self.latents.half(), "actions": self.actions, "starts": self.starts},
                     {"meta": json.dumps({**meta, "clip_frames": self.clip_frames, "maps": self.maps})})

    @classmethod
    def load(cls, path: Path, meta: dict) -> "LatentClips | None":
        """The cache at `path` if it was made with the same `meta` (autoencoder, data), else None."""
        if not Path(path).is_file():
            return None
        try:
            from safetensors import safe_open
            with safe_open(str(path), "pt") as f:
                stored = json.loads((f.metadata() or {}).get("meta", "{}"))
            if any(stored.get(k) != v for k, v in meta.items()):
                return None
            t = load_tensors(path)
            return cls(t["latents"], t["actions"], t["starts"], stored["clip_frames"], stored.get("maps", []))
        except (CheckpointError, SafetensorError, KeyError, ValueError, OSError, RuntimeError):  # truncated, ...
            return None


def _dataset_module():
    try:
        from worldmodel.data import dataset
    except ModuleNotFoundError as e:
        raise UserError(f"the dataset loader is not available ({e})") from None
    return dataset


def split_maps(split: str, maps: list[str] | None = None, path: str | Path | None = None) -> list[str]:
    """The maps a split may read ("train": freedoom2 MAP01-MAP20, "val": MAP21-MAP24), narrowed to
    `maps` if given; a held-out map (or a training map for "val") is refused. A level's dataset
    (`collect --starts level`, at `path`) holds one map, either the level's training episodes or its
    held-out ones (its collect.json says which, by construction): it serves its own split only."""
    from worldmodel.game.maps import TRAIN_MAPS, VAL_MAPS, check_map, split_of
    level = level_dataset(path) if path is not None else None
    if level is not None:
        if level["split"] != split:
            what = {"train": "training episodes", "val": "held-out episodes"}
            raise UserError(f"{path} holds {level['map']}'s {what[level['split']]} (a level's dataset); it cannot "
                            f"serve as {what[split]}")
        if maps and [m.upper() for m in maps] != [level["map"]]:
            raise UserError(f"{path} holds {level['map']} only")
        return [level["map"]]
    allowed = list(TRAIN_MAPS if split == "train" else VAL_MAPS)
    if maps:
        wanted = set()
        for m in maps:
            check_map("freedoom2", m, split)
            if split_of("freedoom2", m) != split:
                raise UserError(f"{m.upper()} is not a {split} map")
            wanted.add(m.upper())
        allowed = [m for m in allowed if m in wanted]
    return allowed


def level_dataset(path: str | Path) -> dict | None:
    """{"wad", "map", "split"} of a level's dataset (`collect --starts level`, read from its collect.json),
    None for any other dataset."""
    from worldmodel.data.collect import CONFIG

    try:
        conf = json.loads((Path(path) / CONFIG).read_text())
    except (OSError, ValueError):
        return None
    if conf.get("starts") != "level":
        return None
    return {"wad": conf["wad"], "map": conf["maps"][0], "split": conf["split"]}


def _check_dataset(path: str | Path):
    ds = _dataset_module()
    return ds.load_manifest(path)  # a DatasetError (UserError) if it is not a dataset


def read_frames(path: str | Path, split: str, maps: list[str] | None = None, max_frames: int | None = None,
                progress: bool = True) -> tuple[torch.Tensor, list[str]]:
    """All frames of the dataset at `path` on the maps of `split` (held-out maps are never read), as
    uint8 (N, H, W, 3); with `max_frames`, about that many spread over the dataset: every k-th frame
    of shards spread evenly over it (at most READ_SPREAD times as many shards as the frames need, so a
    large dataset is not decompressed whole for a small sample)."""
    allowed = split_maps(split, maps, path)
    names, total = spread_shards(_check_dataset(path), allowed, READ_SPREAD * max_frames if max_frames else None)
    every = max(1, math.ceil(total / max_frames)) if (max_frames and total) else 1
    out, seen = [], set()
    shards = _dataset_module().iter_shards(path, allowed, names=names)
    if progress:
        shards = progress_bar(shards, desc=f"reading {Path(path).name} ({split})", unit="shard", leave=False)
    for arrays in shards:
        out.append(torch.from_numpy(arrays["frames"][::every].copy()))
        seen.update(str(m) for m in set(arrays["map"].tolist()))
    if not out or not sum(len(o) for o in out):
        raise UserError(f"{path}: no frames on the {split} maps {allowed[0]}-{allowed[-1]}")
    frames = torch.cat(out)
    if max_frames and len(frames) > max_frames:
        frames = frames[torch.linspace(0, len(frames) - 1, max_frames).round().long()]
    return frames, sorted(seen)


def read_clips(path: str | Path, split: str, clip_frames: int, max_clips: int | None = None,
               maps: list[str] | None = None, progress: bool = True) -> tuple[torch.Tensor, list[str]]:
    """Clips of `clip_frames` consecutive frames of one episode, uint8 (N, clip_frames, H, W, 3), from
    the dataset at `path` on the maps of `split`: non-overlapping windows inside each shard, about
    `max_clips` of them spread over the dataset (whole shards, as `read_frames` reads them); and the
    maps they came from."""
    allowed = split_maps(split, maps, path)
    names, total = spread_shards(_check_dataset(path), allowed, READ_SPREAD * max_clips * clip_frames if max_clips else None)
    every = max(1, math.ceil(total / (max_clips * clip_frames))) if (max_clips and total) else 1
    shards = _dataset_module().iter_shards(path, allowed, names=names)
    if progress:
        shards = progress_bar(shards, desc=f"reading {Path(path).name} ({split})", unit="shard", leave=False)
    out, seen = [], set()
    for arrays in shards:
        seen.update(str(m) for m in set(arrays["map"].tolist()))
        episode = torch.from_numpy(arrays["episode"].astype("int64"))
        frame_index = torch.from_numpy(arrays["frame_index"].astype("int64"))
        order = torch.from_numpy(np.lexsort((frame_index.numpy(), episode.numpy())))
        starts = clip_starts(episode[order], frame_index[order], clip_frames, stride=clip_frames)[::every]
        if len(starts):
            out.append(torch.from_numpy(arrays["frames"])[order[starts[:, None] + torch.arange(clip_frames)]])
    if not out:
        raise UserError(f"{path}: no clip of {clip_frames} consecutive frames on the {split} maps")
    clips = torch.cat(out)
    if max_clips and len(clips) > max_clips:
        clips = clips[torch.linspace(0, len(clips) - 1, max_clips).round().long()]
    return clips, sorted(seen)


def spread_shards(manifest: dict, maps: list[str], max_frames: int | None) -> tuple[set[str], int]:
    """The shards of `maps` to read (names) and their frames: all of them, or whole shards spread evenly
    over the dataset holding about `max_frames` frames."""
    shards = [s for s in manifest["shards"] if set(s["maps"]) & set(maps)]
    total = sum(s["frames"] for s in shards)
    if max_frames and total > max_frames and len(shards) > 1:
        want = min(len(shards), math.ceil(max_frames * len(shards) / total))
        shards = [shards[i] for i in np.unique(np.linspace(0, len(shards) - 1, want).round().astype(int))]
    return {s["name"] for s in shards}, sum(s["frames"] for s in shards)


def clip_starts(episode: torch.Tensor, frame_index: torch.Tensor, clip_frames: int, stride: int = 1) -> torch.Tensor:
    """First rows of every window of `clip_frames` consecutive frames of one episode (rows sorted by
    (episode, frame_index)), every `stride` frames of the episode -- as `ClipDataset` cuts clips."""
    n = len(episode)
    if n < clip_frames:
        return torch.zeros(0, dtype=torch.long)
    s = torch.arange(n - clip_frames + 1)
    e = s + clip_frames - 1
    ok = (episode[s] == episode[e]) & (frame_index[e] - frame_index[s] == clip_frames - 1)
    first = torch.ones(n, dtype=torch.bool)
    first[1:] = episode[1:] != episode[:-1]
    ep_start = torch.cummax(torch.where(first, torch.arange(n), torch.zeros(n, dtype=torch.long)), 0).values
    ok &= ((s - ep_start[s]) % stride) == 0
    return s[ok]


@torch.no_grad()
def encode_dataset(autoencoder: Autoencoder, path: str | Path, split: str, clip_frames: int,
                   maps: list[str] | None = None, stride: int = 1, max_clips: int | None = None,
                   keep_frames: int = 0, progress: bool = True, batch: int = 256, max_frames: int | None = None
                   ) -> tuple[LatentClips, FrameClips | None]:
    """Encode every frame of the split's maps with the (frozen) autoencoder, shard by shard, and cut
    the latents into clips of `clip_frames` consecutive frames of one episode (every `stride` frames;
    `max_clips`: evenly spaced over the dataset). keep_frames > 0 also returns that many clips of real
    frames (evenly spaced), for teacher-forced evaluation. `max_frames`: only whole shards spread evenly over the dataset,
    about that many frames (`spread_shards`)."""
    allowed = split_maps(split, maps, path)
    names, _ = spread_shards(_check_dataset(path), allowed, max_frames)
    device = autoencoder.latent_mean.device
    lat, act, ep, fi, mp, frames = [], [], [], [], [], []
    shards = _dataset_module().iter_shards(path, allowed, names=names)
    if progress:
        shards = progress_bar(shards, desc=f"encoding {Path(path).name} ({split})", unit="shard", leave=False)
    for arrays in shards:
        f = torch.from_numpy(arrays["frames"])
        lat.append(torch.cat([autoencoder.encode(c.to(device)).half().cpu() for c in f.split(batch)]))
        act.append(torch.from_numpy(arrays["actions"].astype("float32")))
        ep.append(torch.from_numpy(arrays["episode"].astype("int64")))
        fi.append(torch.from_numpy(arrays["frame_index"].astype("int64")))
        mp.extend(str(m) for m in set(arrays["map"].tolist()))
        if keep_frames:
            frames.append(f)
    if not lat:
        raise UserError(f"{path}: no frames on the {split} maps {allowed[0]}-{allowed[-1]}")
    episode, frame_index = torch.cat(ep), torch.cat(fi)
    order = torch.from_numpy(__import__("numpy").lexsort((frame_index.numpy(), episode.numpy())))
    latents, actions = torch.cat(lat)[order], torch.cat(act)[order]
    starts = clip_starts(episode[order], frame_index[order], clip_frames, stride)
    if not len(starts):
        raise UserError(f"{path}: no clip of {clip_frames} consecutive frames on the {split} maps")
    if max_clips and len(starts) > max_clips:
        starts = starts[torch.linspace(0, len(starts) - 1, max_clips).round().long()]
    clips = LatentClips(latents, actions, starts, clip_frames, sorted(set(mp)))
    kept = None
    if keep_frames:
        all_frames = torch.cat(frames)[order]
        pick = starts[torch.linspace(0, len(starts) - 1, min(keep_frames, len(starts))).round().long()]
        rows = pick[:, None] + torch.arange(clip_frames)
        kept = FrameClips(all_frames[rows].flatten(0, 1), actions[rows].flatten(0, 1),
                          torch.arange(len(pick)) * clip_frames, clip_frames, clips.maps)
    return clips, kept


def read_eval_clips(path: str | Path, n: int, clip_frames: int, split: str = "val", seed: int = 0) -> FrameClips:
    """n clips of real frames from the dataset loader (`ClipDataset`), evenly spaced over the split's
    episodes: the context, target and rollout frames of teacher-forced evaluation and sample strips."""
    ds = _dataset_module().ClipDataset(path, clip_len=clip_frames, maps=split_maps(split, path=path), stride=clip_frames, seed=seed)
    if not len(ds):
        raise UserError(f"{path}: no clip of {clip_frames} frames on the {split} maps")
    pick = torch.linspace(0, len(ds) - 1, min(n, len(ds))).round().long().tolist()
    items = [ds[i] for i in pick]
    return FrameClips(torch.cat([x["frames"] for x in items]), torch.cat([x["actions"] for x in items]),
                      torch.arange(len(items)) * clip_frames, clip_frames, sorted({x["map"] for x in items}))


class OnlineClips:
    """Clips straight from the dataset loader (`ClipDataset`, its own deterministic order), encoded by
    the frozen autoencoder at every step: for datasets too big to cache, on a GPU."""

    def __init__(self, path: str | Path, autoencoder: Autoencoder, clip_frames: int, maps: list[str],
                 seed: int, stride: int = 1):
        self.ds = _dataset_module().ClipDataset(path, clip_len=clip_frames, maps=maps, stride=stride, seed=seed)
        self.autoencoder, self.clip_frames = autoencoder, clip_frames
        self.maps = sorted(set(self.ds.episode_maps))

    def __len__(self) -> int:
        return len(self.ds)

    @property
    def frames(self) -> int:
        return self.ds.frames

    @torch.no_grad()
    def batch(self, step: int, batch: int, lo: int, hi: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self.ds[i] for i in self.ds.indices(step, batch)[lo:hi]]
        f = torch.stack([x["frames"] for x in items])  # (b, F, H, W, 3)
        device = self.autoencoder.latent_mean.device
        z = self.autoencoder.encode(f.flatten(0, 1).to(device)).float()
        return z.view(*f.shape[:2], *z.shape[1:]).cpu(), torch.stack([x["actions"] for x in items])


@torch.no_grad()
def encode_frames(autoencoder: Autoencoder, frames: torch.Tensor, batch: int = 256, device=None) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised latents (N, C, h, w) float32, on the autoencoder's device."""
    device = device or autoencoder.latent_mean.device
    return torch.cat([autoencoder.encode(c.to(device)).float() for c in frames.split(batch)])


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def dataset_fingerprint(path: str | Path) -> str:
    """Identity of a dataset folder for the latent cache: its path and its manifest (which lists every
    shard's checksum)."""
    p = Path(path)
    h = hashlib.sha256(str(p.resolve()).encode())
    m = p / "manifest.json"
    if m.is_file():
        h.update(m.read_bytes())
    return h.hexdigest()[:16]


def prepare_latents(ae: Autoencoder, ae_digest: str, data: str, split: str, clip_frames: int, maps, stride: int,
                    max_clips, run: Path, rank: int, progress: bool, max_frames: int | None = None
                    ) -> tuple[LatentClips, None]:
    """Latent clips of a dataset under the autoencoder: from RUN/cache/ if made from the same data and
    autoencoder, else encoded by rank 0 and cached (the other ranks wait, then read the cache). A
    UserError (no such data) is raised on every rank."""
    cache = Path(run) / "cache" / f"{split}_latents.safetensors"
    meta = {"autoencoder": ae_digest, "data": dataset_fingerprint(data), "split": split, "clip_frames": clip_frames,
            "stride": stride, "max_clips": max_clips, "wanted_maps": sorted(maps) if maps else None,
            "max_frames": max_frames}
    clips, error = None, None
    if rank == 0:
        try:
            clips = LatentClips.load(cache, meta)
            if clips is None and cache.exists():
                print(f"worldmodel train: {cache} was made from other data or settings, or cannot be read "
                      f"(truncated?); encoding the latents again", file=sys.stderr)
            if clips is None:
                clips, _ = encode_dataset(ae, data, split, clip_frames, maps, stride, max_clips, 0, progress,
                                          max_frames=max_frames)
                cache.parent.mkdir(parents=True, exist_ok=True)
                clips.save(cache, meta)
        except UserError as e:
            error = e
    if not rank0_flag(error is None):
        raise error or UserError(f"{data}: no usable {split} data (see rank 0)")
    if clips is None:
        clips = LatentClips.load(cache, meta)
        if clips is None:
            raise UserError(f"{cache}: the latent cache could not be read")
    return clips, None
