"""Training: `worldmodel train autoencoder` and `worldmodel train model`.

    worldmodel train autoencoder --data data/train --val-data data/val --out runs/ae
    worldmodel train model --data data/train --val-data data/val --autoencoder runs/ae --out runs/dit
    torchrun --nproc_per_node 8 -m worldmodel.cli train model ...      # DDP, the same command

The autoencoder is trained first (reconstruction loss on frames of the training maps, PSNR on the
validation maps, latent statistics calibrated at the end). The transformer is then trained on clips of
`clip_frames` frames whose latents are encoded once with the frozen autoencoder and cached in the run
folder: flow matching with an independent noise level per frame (Diffusion Forcing) and noisy
context prefixes (GameNGen), see `diffusion.sample_training_noise_levels`.

Determinism and resuming. Everything random in a step -- which clips, which noise levels, which noise
-- is drawn from generators seeded by (seed, step), for the *global* batch, of which each DDP rank takes
its slice. So the data order is a function of the step alone, a run resumed from a checkpoint replays
exactly the steps an uninterrupted run would have taken (same losses, same weights), and N processes
see the same batches as one. Checkpoints are folders `RUN/checkpoints/step_XXXXXXXX/` written under a
temporary name and renamed (atomic): `model.safetensors`, `ema.safetensors`, `optimizer.safetensors`
(every optimizer state tensor), `rng.safetensors` and `state.json` (step, optimizer hyper-parameters,
data position, elapsed time) -- no pickle anywhere. `--resume` continues from the newest one.

The run folder:
    config.json          the resolved model and training config (written at start)
    metrics.jsonl        one JSON object per logged step / validation
    checkpoints/         resumable training state (the newest `keep_checkpoints`)
    samples/step_*.png   real vs teacher-forced vs autoregressive frames on validation maps
    export/              a ready-to-play checkpoint (`WorldModel.from_pretrained(RUN/export)`)
    cache/               latents of the dataset under the frozen autoencoder
"""
from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError

from worldmodel.model import diffusion
from worldmodel.metrics import psnr_frames, psnr_pooled
from worldmodel.model.autoencoder import Autoencoder, AutoencoderConfig, PatchDiscriminator, reconstruction_loss
from worldmodel.model.checkpoint import (CONFIG_FILE, FORMAT_VERSION, WEIGHT_FILES, CheckpointError,
                                   check_state_dict, load_tensors, read_config, save_pretrained, save_tensors)
from worldmodel.files import atomic_write_json, check_output_path
from worldmodel.parsing import parse_hw
from worldmodel.device import native_bf16, parse_device, resolve_device
from worldmodel.errors import UserError
from worldmodel.model.transformer import ModelConfig, WorldTransformer, preset
from worldmodel.progress import progress_bar
from worldmodel.inference.sampler import FrameSampler

STATE_FORMAT = 1
READ_SPREAD = 4  # read_frames with max_frames: read this many times more frames than kept, from spread shards
AE_FILE = "autoencoder.safetensors"

# --------------------------------------------------------------------------------------------------
# Training configs
# --------------------------------------------------------------------------------------------------


@dataclass
class AutoencoderTrainConfig:
    steps: int = 4000
    batch: int = 32  # frames per step (global)
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio at `steps`
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    val_every: int = 500
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    val_frames: int = 512  # validation frames for PSNR
    crop: tuple[int, int] | None = None  # train on random (h, w) crops (convolutions: ~H*W/(h*w) x faster)
    adv_weight: float = 0.0  # > 0: a PatchGAN critic trains beside the autoencoder (hinge loss), and the
                             # autoencoder also minimises adv_weight * -critic(reconstruction)
    adv_start: int = 0  # the step from which the autoencoder feels the critic (the critic trains from 0)
    init: str | None = None  # an autoencoder (run folder, file or checkpoint folder) whose weights start the run
    decoder_only: bool = False  # train the decoder alone: the encoder (and the latents' statistics) stay
                                # as `init` has them, so a transformer trained on its latents still fits
    calibrate_frames: int = 4096
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        check_sizes(self, at_least_1=("steps", "batch", "log_every", "val_every", "ckpt_every", "keep_checkpoints",
                                      "calibrate_frames"),
                    at_least_0=("warmup", "val_frames", "adv_start"))


@dataclass
class ModelTrainConfig:
    steps: int = 20000
    batch: int = 16  # clips per step (global, split over DDP ranks)
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: int = 200
    weight_decay: float = 0.01
    beta2: float = 0.99
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    context_prob: float = 0.5  # share of clips laid out as context prefix + noisy frames
    context_max: float = 0.3  # highest noise level of a context frame (noise augmentation)
    noise_shift: float = 1.0  # > 1: noise levels of the other frames biased towards pure noise
    self_forcing: int = 0  # > 0: on a share of the steps, K context frames are the model's own rollout
    self_forcing_prob: float = 0.5  # the share of steps that are self-forced
    clip_frames: int = 0  # 0: the model's `clip_frames` (sinks + window + max draft)
    init: str | None = None  # a checkpoint folder whose transformer weights start a new run
    seed: int = 0
    log_every: int = 10
    val_every: int = 500  # validation loss, teacher-forced PSNR and a sample strip
    ckpt_every: int = 500  # checkpoint + export
    keep_checkpoints: int = 2
    val_clips: int = 32  # validation clips for the loss
    eval_clips: int = 16  # validation clips for teacher-forced PSNR
    sample_steps: int = 0  # 0: the model's `sample_steps`
    compile: bool = False
    max_time: float = 0.0  # > 0: stop after this many seconds of training in this process (checkpoint + export)
    amp: bool = True  # bf16 autocast on CUDA and on CPUs with native bf16 (`amp_enabled`)
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        check_sizes(self, at_least_1=("steps", "batch", "log_every", "val_every", "ckpt_every", "keep_checkpoints"),
                    at_least_0=("warmup", "clip_frames", "val_clips", "eval_clips", "sample_steps"))

    def frames(self, cfg: ModelConfig) -> int:
        return self.clip_frames or cfg.clip_frames


def check_sizes(obj, at_least_1: tuple[str, ...] = (), at_least_0: tuple[str, ...] = ()) -> None:
    """Counts and sizes (steps, batch, ...) refused up front, naming the flag, before any data is read."""
    for names, low in ((at_least_1, 1), (at_least_0, 0)):
        for name in names:
            v = getattr(obj, name)
            if v is not None and v < low:
                raise UserError(f"--{name.replace('_', '-')} must be at least {low}, got {v}")


# --------------------------------------------------------------------------------------------------
# Distributed
# --------------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            x = x.detach().clone()
            torch.distributed.all_reduce(x)
            x /= self.world
        return x


def setup_distributed(device: str = "auto") -> Dist:
    """One process, or the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK): nccl on
    CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = parse_device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(minutes=30))
    return Dist(rank, world, local, dev)


def amp_enabled(want: bool, device: torch.device) -> bool:
    """bf16 autocast for training: on CUDA, and on CPUs that do bf16 natively (a training step of the
    tiny model ran 1.56x faster than float32 on an AVX512-BF16 CPU); elsewhere float32."""
    return bool(want) and (device.type == "cuda" or (device.type == "cpu" and native_bf16()))


def add_amp_argument(parser: argparse.ArgumentParser) -> None:
    """`--no-amp` (`train model`, `train throughput`, `distill`): the switch of `amp_enabled`."""
    parser.add_argument("--no-amp", action="store_true",
                        help="no bf16 autocast (on by default on CUDA and on CPUs with native bf16: AVX512-BF16, AMX)")


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


# --------------------------------------------------------------------------------------------------
# Deterministic data order, noise and schedule: functions of (seed, step) alone
# --------------------------------------------------------------------------------------------------


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + stream * 104_729) % (2 ** 63))


def batch_indices(step: int, batch: int, n: int, seed: int) -> torch.Tensor:
    """The global batch of `step`: positions step*batch .. step*batch+batch-1 of an endless sequence of
    shuffled epochs (a fresh permutation of 0..n-1 per epoch, seeded by (seed, epoch))."""
    if n < 1:
        raise UserError("no training examples")
    out, pos, need = [], step * batch, batch
    while need:
        epoch, offset = divmod(pos, n)
        take = torch.randperm(n, generator=step_generator(seed, epoch, stream=1))[offset:offset + need]
        out.append(take)
        pos, need = pos + len(take), need - len(take)
    return torch.cat(out)


def lr_at(step: int, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to lr * min_ratio at `total` steps (constant after)."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


# --------------------------------------------------------------------------------------------------
# Data: frames from the dataset, latents cached under the frozen autoencoder
# --------------------------------------------------------------------------------------------------


@dataclass
class FrameClips:
    """Clips of real frames: all frames back to back, `starts` the first frame of each clip."""
    frames: torch.Tensor  # (N, H, W, 3) uint8
    actions: torch.Tensor  # (N, A) float32, actions[i] produced frames[i]
    starts: torch.Tensor  # (M,) int64
    clip_frames: int
    maps: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.starts)

    def clip(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.starts[torch.as_tensor(idx)].reshape(-1, 1) + torch.arange(self.clip_frames)
        return self.frames[rows], self.actions[rows]  # (B, F, H, W, 3), (B, F, A)


@dataclass
class LatentClips:
    """Clips of cached latents: the same layout as FrameClips."""
    latents: torch.Tensor  # (N, C, h, w), stored float16
    actions: torch.Tensor  # (N, A) float32
    starts: torch.Tensor  # (M,) int64
    clip_frames: int
    maps: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.starts)

    def clip(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.starts[torch.as_tensor(idx)].reshape(-1, 1) + torch.arange(self.clip_frames)
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
        shards = progress_bar(shards, desc=f"reading {Path(path).name} ({split})", unit="shard", leave=False,
                              disable=None)
    for arrays in shards:
        out.append(torch.from_numpy(arrays["frames"][::every].copy()))
        seen.update(str(m) for m in set(arrays["map"].tolist()))
    if not out or not sum(len(o) for o in out):
        raise UserError(f"{path}: no frames on the {split} maps {allowed[0]}-{allowed[-1]}")
    frames = torch.cat(out)
    if max_frames and len(frames) > max_frames:
        frames = frames[torch.linspace(0, len(frames) - 1, max_frames).round().long()]
    return frames, sorted(seen)


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
        shards = progress_bar(shards, desc=f"encoding {Path(path).name} ({split})", unit="shard", leave=False,
                              disable=None)
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


# --------------------------------------------------------------------------------------------------
# Training state: safetensors for tensors, JSON for the rest
# --------------------------------------------------------------------------------------------------


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        idx, _, name = key.partition(".")
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def set_rng_state(t: dict[str, torch.Tensor]) -> None:
    if "torch" in t:
        torch.set_rng_state(t["torch"])
    if torch.cuda.is_available():
        states = [t[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in t]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def checkpoint_dirs(run: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders start with '.')."""
    d = Path(run) / "checkpoints"
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def save_checkpoint(run: Path, step: int, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                    state: dict, keep: int = 2) -> Path:
    """RUN/checkpoints/step_XXXXXXXX/ written under a temporary name, then renamed; the oldest beyond
    `keep` are removed."""
    root = Path(run) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".step_{step:08d}."))
    try:
        for name, module in modules.items():
            save_tensors(tmp / f"{name}.safetensors", module.state_dict())
        opt_tensors, opt_meta = optimizer_state(optimizer)
        save_tensors(tmp / "optimizer.safetensors", opt_tensors)
        save_tensors(tmp / "rng.safetensors", rng_state())
        atomic_write_json(tmp / "state.json", {"format": STATE_FORMAT, "step": step, "optimizer": opt_meta, **state})
        os.chmod(tmp, 0o755)
        if final.exists():  # the same step written again (a resumed run): replace it
            old = root / f".old_{final.name}.{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(run)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> dict:
    """Load a checkpoint folder into modules and optimizer; returns its state.json."""
    ckpt = Path(ckpt)
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / 'state.json'}: unreadable ({e})") from None
    if state.get("format", 0) > STATE_FORMAT:
        raise CheckpointError(f"{ckpt / 'state.json'}: training state format {state.get('format')} is newer "
                              f"than this worldmodel reads ({STATE_FORMAT})")
    for name, module in modules.items():
        f = ckpt / f"{name}.safetensors"
        tensors = load_tensors(f)
        check_state_dict(tensors, module, f)
        module.load_state_dict(tensors)
    try:
        load_optimizer_state(optimizer, load_tensors(ckpt / "optimizer.safetensors"), state["optimizer"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{ckpt / 'optimizer.safetensors'}: does not match this model ({e})") from None
    set_rng_state(load_tensors(ckpt / "rng.safetensors"))
    return state


def _trim_metrics(run: Path, step: int) -> None:
    """On resume: drop metric lines after the checkpoint's step (they are recomputed)."""
    f = Path(run) / "metrics.jsonl"
    if not f.is_file():
        return
    keep = []
    for line in f.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            pass
    f.write_text("".join(line + "\n" for line in keep))


class MetricsLog:
    def __init__(self, run: Path, enabled: bool):
        self.path, self.enabled = Path(run) / "metrics.jsonl", enabled

    def write(self, **record) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def plot(self) -> None:
        """RUN/curves.png from metrics.jsonl: training and validation loss, and validation PSNR against
        its baseline (copy-last for the model, none for the autoencoder)."""
        if self.enabled and self.path.is_file():
            plot_metrics([json.loads(x) for x in self.path.read_text().splitlines() if x.strip()],
                         self.path.with_name("curves.png"))


# the validation PSNR curves of each kind of run: (metrics key, label)
PSNR_CURVES = (("psnr_tf", "model, teacher-forced next frame"), ("psnr_copy_last", "copy last frame"),
               ("psnr_rollout", "model, rollout of the 2 sample-strip clips"),
               ("psnr_rollout_copy", "copy last frame, the same 2 clips"),
               ("val_psnr", "autoencoder reconstruction"))


def plot_metrics(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    sharp = series("val_sharpness")[0]  # autoencoder runs: a third panel, sharpness against the real frames
    fig, axes = plt.subplots(1, 3 if sharp else 2, figsize=(16 if sharp else 11, 4))
    ax_l, ax_p = axes[:2]
    if sharp:
        for key, label in (("val_sharpness", "reconstruction"), ("val_sharpness_real", "real frames")):
            x, y = series(key)
            axes[2].plot(x, y, label=label, marker="o", ls="--" if key.endswith("real") else "-")
        axes[2].set(xlabel="step", ylabel="median Laplacian variance", yscale="log", title="validation sharpness")
    for key, label in (("loss", "training loss"), ("val_loss", "validation loss"), ("val_loss_ema", "validation loss, EMA")):
        x, y = series(key)
        if x:
            ax_l.plot(x, y, label=label, lw=0.8 if key == "loss" else 1.6, marker=None if key == "loss" else "o")
    ax_l.set(xlabel="step", ylabel="loss", yscale="log", title="loss")
    for key, label in PSNR_CURVES:
        x, y = series(key)
        if x:
            ax_p.plot(x, y, label=label, marker="o", ls="--" if "copy" in key else "-")
    ax_p.set(xlabel="step", ylabel="PSNR (dB)", title="validation PSNR")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------------


def init_from(model: WorldTransformer, path: str | Path, cfg: ModelConfig) -> None:
    """Copy the transformer weights of the checkpoint at `path` into `model`: a new run that continues
    a trained model (its optimizer state is not in a checkpoint folder; `--resume` continues a run
    exactly). The model configs must agree except for the sampling defaults and the context noise, and
    `prev_frame` may be switched on: the previous frame's input weights start at zero, so the new model
    computes exactly what the checkpoint's did and learns to use the previous frame from there."""
    from worldmodel.model.checkpoint import load_pretrained

    icfg, _, transformer, _, _ = load_pretrained(path)
    free = ("sample_steps", "sample_shift", "context_noise")
    theirs, ours = icfg.to_dict(), cfg.to_dict()
    diff = [k for k in ours if k not in free and theirs.get(k) != ours[k]
            and not (k == "prev_frame" and ours[k] and not theirs.get(k))]
    if diff:
        raise UserError(f"--init {path}: its model config differs from this run's in "
                        + ", ".join(f"{k} ({theirs.get(k)} vs {ours[k]})" for k in diff))
    state = transformer.state_dict()
    w = state["patch_embed.weight"]
    if model.patch_embed.weight.shape != w.shape:  # prev_frame switched on: [old weights, zeros]
        state["patch_embed.weight"] = torch.cat((w, torch.zeros_like(w)), dim=1)
    model.load_state_dict(state)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """ema <- d * ema + (1 - d) * model, with d warming up as (1 + step) / (10 + step)."""
    d = min(decay, (1 + step) / (10 + step))
    e = [p for p in ema.parameters()]
    m = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(e, m, 1.0 - d)


# --------------------------------------------------------------------------------------------------
# Evaluation: validation loss, teacher-forced PSNR, sample strips
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def self_forced_clip(model: WorldTransformer, cfg: ModelConfig, x0: torch.Tensor, actions: torch.Tensor,
                     real: int, k: int, steps: int, seed: int) -> torch.Tensor:
    """Self Forcing's context, the training path being the inference path: from the first `real` frames
    of real clips x0 (B, F, C, h, w) (their actions (B, F, A)), the model rolls out the next k frames
    with the engine's own sampler (`FrameSampler`: the KV cache, the fused commit, counter-based noise
    seeded by `seed`, `steps` Euler steps), fed the real actions. Returns x0 with frames real..real+k-1
    replaced by the model's own (no gradient flows into them)."""
    was_training = model.training
    model.eval()
    sampler = FrameSampler(model, cfg, steps, seed=seed, batch_size=x0.shape[0])
    sampler.reset(x0[:, :real], actions[:, :real])
    own = [sampler.next(actions[:, real + i:real + i + 1]) for i in range(k)]
    model.train(was_training)
    return torch.cat((x0[:, :real], *[o.to(x0.dtype) for o in own], x0[:, real + k:]), dim=1)


def self_forcing_layout(batch: int, frames: int, real: int, k: int, context_max: float, g: torch.Generator,
                        shift: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise levels (batch, frames) and loss weights (batch, frames) of a self-forced clip: the real and
    the self-made context (the first real + k frames) at context levels in [0, context_max] as the
    engine commits them, the frames after it at independent levels (Diffusion Forcing); the loss counts
    every frame but the self-made ones (their clean values are the model's own, not the game's)."""
    t = diffusion.shift_noise_levels(diffusion.sample_noise_levels((batch, frames), generator=g), shift)
    ctx = torch.rand((batch, real + k), generator=g) * context_max
    t = torch.cat((ctx, t[:, real + k:]), dim=1)
    w = torch.ones(batch, frames)
    w[:, real:real + k] = 0.0
    return t, w


@torch.no_grad()
def validation_loss(model: nn.Module, clips: LatentClips, n: int, batch: int, seed: int, device,
                    context_prob: float, context_max: float) -> float:
    """Mean flow-matching loss over the first n clips with fixed noise (comparable across steps)."""
    n = min(n, len(clips))
    if n == 0:
        return float("nan")
    total = 0.0
    for i in range(0, n, batch):
        idx = torch.arange(i, min(n, i + batch))
        x0, a = clips.clip(idx)
        g = step_generator(seed, i, stream=7)
        t = diffusion.sample_training_noise_levels(len(idx), x0.shape[1], g, context_prob=context_prob,
                                                   context_max=context_max)
        noise = torch.randn(x0.shape, generator=g)
        total += diffusion.flow_matching_loss(model, x0.to(device), a.to(device), t.to(device),
                                              noise.to(device)).item() * len(idx)
    return total / n


def _context_len(cfg: ModelConfig, clip_frames: int) -> int:
    return max(1, min(cfg.cache_frames, clip_frames - 1))


@torch.no_grad()
def teacher_forced(model: WorldTransformer, autoencoder: Autoencoder, cfg: ModelConfig, frames: torch.Tensor,
                   actions: torch.Tensor, steps: int, seed: int = 0, k: int | None = None) -> dict:
    """One frame ahead from real context, for a batch of real clips (B, F, H, W, 3) uint8: the first k
    frames are the context (encoded and committed as the engine does), frame k is generated with the
    sampler and compared with the real one. Returns mean PSNRs: model, copy-last-frame baseline and the
    autoencoder's reconstruction of frame k (a ceiling)."""
    device = next(model.parameters()).device
    B, Fr = frames.shape[:2]
    k = k or _context_len(cfg, Fr)
    ctx = encode_frames(autoencoder, frames[:, :k].flatten(0, 1), device=device).view(B, k, *cfg_latent(cfg))
    sampler = FrameSampler(model, cfg, steps, seed=seed, batch_size=B)
    sampler.reset(ctx.to(device), actions[:, :k].to(device))
    latent = sampler.generate(actions[:, k:k + 1].to(device))[:, 0]
    pred = autoencoder.decode_uint8(latent).cpu()
    real = frames[:, k]
    recon = autoencoder.reconstruct(real.to(device)).cpu()
    return {"psnr": psnr_frames(pred, real).mean().item(), "psnr_copy_last": psnr_frames(frames[:, k - 1], real).mean().item(),
            "psnr_ae": psnr_frames(recon, real).mean().item(), "psnr_pooled": psnr_pooled(pred, real),
            "psnr_pooled_copy_last": psnr_pooled(frames[:, k - 1], real), "clips": B, "context": k}


def cfg_latent(cfg: ModelConfig) -> tuple[int, int, int]:
    return (cfg.latent_channels, *cfg.latent_size)


@torch.no_grad()
def sample_strip(model: WorldTransformer, autoencoder: Autoencoder, cfg: ModelConfig, frames: torch.Tensor,
                 actions: torch.Tensor, steps: int, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """For real clips (B, F, H, W, 3): rows per clip = real frames k..F-1, teacher-forced predictions
    (each from all real frames before it), and an autoregressive rollout from the first k real frames
    fed the real actions. Returns the image (uint8 (rows*H, cols*W, 3)) and rollout PSNRs."""
    device = next(model.parameters()).device
    B, Fr, H, W, _ = frames.shape
    k = _context_len(cfg, Fr)
    lat = encode_frames(autoencoder, frames.flatten(0, 1), device=device).view(B, Fr, *cfg_latent(cfg)).to(device)
    act = actions.to(device)
    tf = []
    for j in range(k, Fr):
        s = FrameSampler(model, cfg, steps, seed=seed, batch_size=B)
        s.reset(lat[:, :j], act[:, :j])
        tf.append(autoencoder.decode_uint8(s.generate(act[:, j:j + 1])[:, 0]).cpu())
    s = FrameSampler(model, cfg, steps, seed=seed, batch_size=B)
    s.reset(lat[:, :k], act[:, :k])
    ar = [autoencoder.decode_uint8(s.next(act[:, j:j + 1])[:, 0]).cpu() for j in range(k, Fr)]
    tf, ar, real = torch.stack(tf, 1), torch.stack(ar, 1), frames[:, k:]  # (B, R, H, W, 3)
    rows = torch.stack((real, tf, ar), 1).flatten(0, 1)  # (3B, R, H, W, 3)
    image = rows.permute(0, 2, 1, 3, 4).reshape(rows.shape[0] * H, rows.shape[1] * W, 3)
    stats = {"psnr_rollout": psnr_frames(ar, real).mean().item(),
             "psnr_rollout_copy": psnr_frames(frames[:, k - 1:k].expand_as(real), real).mean().item(),
             "rollout_frames": Fr - k}
    return image, stats


def save_png(path: Path, image: torch.Tensor) -> None:
    from PIL import Image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image.numpy()).save(tmp, format="PNG")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# Export: a ready-to-play checkpoint folder
# --------------------------------------------------------------------------------------------------


def export(run: Path, cfg: ModelConfig, autoencoder: Autoencoder, transformer: WorldTransformer, info: dict) -> Path:
    """RUN/export/, replaced as a whole (written next to it, then swapped in)."""
    run = Path(run)
    final = run / "export"
    tmp = Path(tempfile.mkdtemp(dir=run, prefix=".export."))
    try:
        save_pretrained(tmp, cfg, autoencoder, transformer, info)
        os.chmod(tmp, 0o755)
        old = run / f".export.old.{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# --------------------------------------------------------------------------------------------------
# The autoencoder
# --------------------------------------------------------------------------------------------------


def save_autoencoder(run: Path, cfg: ModelConfig, autoencoder: Autoencoder, info: dict) -> Path:
    run = Path(run)
    save_tensors(run / AE_FILE, autoencoder.state_dict())
    atomic_write_json(run / CONFIG_FILE, {"format_version": FORMAT_VERSION, "kind": "autoencoder",
                                          "model": cfg.to_dict(), "autoencoder": autoencoder.cfg.to_dict(),
                                          "info": info})
    return run / AE_FILE


def load_autoencoder(path: str | Path) -> tuple[Autoencoder, dict]:
    """An autoencoder from a `train autoencoder` run folder, its `autoencoder.safetensors` file, or a
    checkpoint folder (config.json + autoencoder.safetensors). Returns it (eval mode) and its config."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such autoencoder run folder or file")
    folder, f = (p, p / AE_FILE) if p.is_dir() else (p.parent, p)
    config = read_config(folder)
    if "autoencoder" in config:
        ae_cfg = AutoencoderConfig(**config["autoencoder"])
    else:
        ae_cfg = ModelConfig.from_dict(config["model"]).autoencoder
    ae = Autoencoder(ae_cfg)
    tensors = load_tensors(f)
    check_state_dict(tensors, ae, f)
    ae.load_state_dict(tensors)
    return ae.eval(), config


def _ae_shape(c: AutoencoderConfig) -> tuple:
    return (tuple(c.frame_size), c.latent_channels, tuple(c.channels), tuple(c.res_blocks))


def train_autoencoder(frames: torch.Tensor, out: str | Path, cfg: ModelConfig, tcfg: AutoencoderTrainConfig,
                      val_frames: torch.Tensor | None = None, resume: bool = False, info: dict | None = None,
                      on_step=None) -> dict:
    """Train the autoencoder of `cfg` on uint8 frames (N, H, W, 3); PSNR on `val_frames`; calibrate the
    latent statistics at the end; write RUN/autoencoder.safetensors + RUN/config.json.
    Returns a summary (losses of the steps run, validation PSNR, ...)."""
    out = Path(out)
    # under torchrun the process group stays up for the rest of the process (the CLI closes it)
    return _train_autoencoder(frames, out, cfg, tcfg, val_frames, resume, info or {}, on_step,
                              setup_distributed(tcfg.device))


def _check_frames(frames: torch.Tensor, cfg: ModelConfig, what: str) -> None:
    H, W = cfg.frame_size
    if frames.ndim != 4 or tuple(frames.shape[1:]) != (H, W, 3) or frames.dtype != torch.uint8:
        raise UserError(f"{what}: frames are {tuple(frames.shape)} {frames.dtype}; the model expects uint8 "
                        f"(N, {H}, {W}, 3) (change the frame size with --set frame_size={H},{W})")


def _train_autoencoder(frames, out, cfg, tcfg, val_frames, resume, info, on_step, dist: Dist) -> dict:
    _check_frames(frames, cfg, "training data")
    if val_frames is not None:
        _check_frames(val_frames, cfg, "validation data")
    if tcfg.crop:
        h, w = tcfg.crop
        d = cfg.autoencoder.downsample
        if h % d or w % d or h > cfg.frame_size[0] or w > cfg.frame_size[1]:
            raise UserError(f"--crop {h}x{w}: must fit in {cfg.frame_size[0]}x{cfg.frame_size[1]} and be divisible by {d}")
    if tcfg.batch % dist.world:
        raise UserError(f"--batch {tcfg.batch} is not divisible by the {dist.world} processes")
    out.mkdir(parents=True, exist_ok=True)
    device = dist.device
    torch.manual_seed(tcfg.seed)
    ae = Autoencoder(cfg.autoencoder).to(device)
    if tcfg.decoder_only and not tcfg.init:
        raise UserError("--decoder-only needs --init: the autoencoder whose encoder stays as it is")
    if tcfg.init:
        init, _ = load_autoencoder(tcfg.init)
        if _ae_shape(init.cfg) != _ae_shape(ae.cfg):
            raise UserError(f"--init {tcfg.init}: the autoencoder {_ae_shape(init.cfg)} does not match this run's "
                            f"{_ae_shape(ae.cfg)}")
        ae.load_state_dict(init.state_dict())
    ae.encoder.requires_grad_(not tcfg.decoder_only)
    critic = PatchDiscriminator().to(device) if tcfg.adv_weight > 0 else None
    modules: dict[str, nn.Module] = {"autoencoder": ae, **({"discriminator": critic} if critic else {})}
    trained = [ae.decoder if tcfg.decoder_only else ae, *([critic] if critic else [])]
    opt = torch.optim.AdamW([{"params": m.parameters()} for m in trained], lr=tcfg.lr,
                            weight_decay=tcfg.weight_decay)
    start, elapsed = 0, 0.0
    ckpts = checkpoint_dirs(out) if resume else []
    if ckpts:
        if (ckpts[-1] / "discriminator.safetensors").is_file() != (critic is not None):
            raise UserError(f"{out}: the run was started {'with' if critic is None else 'without'} --adv-weight; "
                            f"resume it the same way")
        state = load_checkpoint(ckpts[-1], modules, opt)
        start, elapsed = state["step"], state.get("elapsed_s", 0.0)
        if dist.main:
            _trim_metrics(out, start)
            print(f"resuming from {ckpts[-1]} (step {start})", file=sys.stderr)
    elif dist.main:
        (out / "metrics.jsonl").unlink(missing_ok=True)
        atomic_write_json(out / "train_config.json", {"kind": "autoencoder", "model": cfg.to_dict(),
                                                      "autoencoder": cfg.autoencoder.to_dict(),
                                                      "train": asdict(tcfg), "world_size": dist.world, **info})
    net: nn.Module = AutoencoderLoss(ae, critic)
    if dist.world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    log = MetricsLog(out, dist.main)
    b = tcfg.batch // dist.world
    losses: list[float] = []
    val = {}

    def eval_psnr() -> dict:
        if val_frames is None or not len(val_frames):
            return {}
        ae.eval()
        v = val_frames[:tcfg.val_frames]
        rec = torch.cat([ae.reconstruct(c.to(device)).cpu() for c in v.split(64)])
        ae.train()
        pick = torch.linspace(0, len(v) - 1, min(8, len(v))).round().long()  # real above, reconstruction below
        H, W = v.shape[1:3]
        strip = torch.stack((v[pick], rec[pick])).permute(0, 2, 1, 3, 4).reshape(2 * H, len(pick) * W, 3)
        save_png(out / "samples" / "autoencoder_latest.png", strip)
        return {"val_psnr": psnr_frames(rec, v).mean().item(), "val_frames": len(v),
                "val_sharpness": median_sharpness(rec), "val_sharpness_real": median_sharpness(v)}

    bar = _progress(tcfg, dist, start, "autoencoder")
    window_t, n_since = 0.0, 0
    ae.train()
    for step in range(start, tcfg.steps):
        t_step = time.perf_counter()
        lr = lr_at(step, tcfg.lr, tcfg.warmup, tcfg.steps, tcfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = batch_indices(step, tcfg.batch, len(frames), tcfg.seed)[dist.rank * b:(dist.rank + 1) * b]
        g = step_generator(tcfg.seed, step, stream=2 + dist.rank)
        adv_weight = tcfg.adv_weight if step >= tcfg.adv_start else 0.0
        total, parts = net(random_crops(frames[idx], tcfg.crop, g).to(device), g, adv_weight)
        opt.zero_grad(set_to_none=True)
        total.backward()
        gnorm = nn.utils.clip_grad_norm_(trained[0].parameters(), tcfg.grad_clip) if tcfg.grad_clip else torch.zeros(())
        if critic is not None and tcfg.grad_clip:
            nn.utils.clip_grad_norm_(critic.parameters(), tcfg.grad_clip)
        opt.step()
        loss_v = dist.mean(parts["loss"]).item()  # the reconstruction loss: comparable with and without a critic
        losses.append(loss_v)
        dt = time.perf_counter() - t_step
        elapsed, window_t, n_since = elapsed + dt, window_t + dt, n_since + tcfg.batch
        done = step + 1
        if on_step is not None:
            on_step(done, loss_v)
        if done % tcfg.log_every == 0 or done == tcfg.steps:
            rate = n_since / max(window_t, 1e-9)
            window_t, n_since = 0.0, 0
            adv = {k: dist.mean(v).item() for k, v in parts.items() if k != "loss"}
            log.write(step=done, loss=loss_v, lr=lr, grad_norm=float(gnorm), frames_per_s=rate, **adv)
            if bar is not None:
                bar.set_postfix(loss=f"{loss_v:.4f}", fps=f"{rate:.1f}",
                                refresh=False, **({"psnr": f"{val['val_psnr']:.2f}", "sharp": f"{val['val_sharpness']:.0f}"} if val else {}))
        if bar is not None:
            bar.update(1)
        if dist.main and (done % tcfg.val_every == 0 or done == tcfg.steps):
            val = eval_psnr()
            if val:
                log.write(step=done, **val)
                log.plot()
        if done % tcfg.ckpt_every == 0 or done == tcfg.steps:
            if dist.main:
                save_checkpoint(out, done, modules, opt, {"elapsed_s": elapsed, "kind": "autoencoder",
                                                                      "data_position": done * tcfg.batch},
                                tcfg.keep_checkpoints)
            dist.barrier()
    if bar is not None:
        bar.close()
    ae.eval()
    summary = {}
    if dist.main:
        if not tcfg.decoder_only:  # a new encoder: measure its latents' statistics
            g = step_generator(tcfg.seed, 0, stream=5)
            calib = frames[torch.randperm(len(frames), generator=g)[:tcfg.calibrate_frames]]
            ae.calibrate(calib.to(device), batch_size=128)
        val = eval_psnr() or val
        summary = {"steps": tcfg.steps, "frames": len(frames), "batch": tcfg.batch, "time_s": round(elapsed, 1),
                   "hardware": hardware(device), "world_size": dist.world, **val, **info}
        save_autoencoder(out, cfg, ae, summary)
        log.write(step=tcfg.steps, final=True, **val)
    dist.barrier()
    return {**summary, "losses": losses, "start_step": start}


def median_sharpness(frames: torch.Tensor) -> float:
    """Median Laplacian variance of uint8 frames (N, H, W, 3): the sharpness statistic of `worldmodel
    eval`'s stability check, so an autoencoder's floor on it shows while it trains."""
    from worldmodel.metrics import frame_stats

    return float(np.median([frame_stats(f)["sharpness"] for f in frames.numpy()]))


def random_crops(frames: torch.Tensor, crop: tuple[int, int] | None, g: torch.Generator) -> torch.Tensor:
    """A random (h, w) window of each frame (B, H, W, 3); the frames as they are without `crop`."""
    if not crop:
        return frames
    h, w = crop
    B, H, W, _ = frames.shape
    if (h, w) == (H, W):
        return frames
    ys = torch.randint(0, H - h + 1, (B,), generator=g).tolist()
    xs = torch.randint(0, W - w + 1, (B,), generator=g).tolist()
    return torch.stack([f[y:y + h, x:x + w] for f, y, x in zip(frames, ys, xs)])


class AutoencoderLoss(nn.Module):
    """The autoencoder's training loss as one forward pass (what DistributedDataParallel syncs gradients
    through): L1 + MSE reconstruction and, with a critic, the hinge GAN losses. One backward trains
    both sides: the critic's loss sees detached reconstructions, and the autoencoder's adversarial term
    goes through a detached copy of the critic's weights, so neither loss moves the other's weights.
    Returns (the total to backpropagate, {"loss": reconstruction, "critic_loss", "adv_loss"} detached)."""

    def __init__(self, autoencoder: Autoencoder, critic: PatchDiscriminator | None = None):
        super().__init__()
        self.autoencoder, self.critic = autoencoder, critic

    def forward(self, frames: torch.Tensor, generator: torch.Generator | None = None,
                adv_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, recon = self.autoencoder.reconstruct_noisy(frames, generator)
        rec = reconstruction_loss(recon, x)
        if self.critic is None:
            return rec, {"loss": rec.detach()}
        critic_loss = F.relu(1 - self.critic(x)).mean() + F.relu(1 + self.critic(recon.detach())).mean()
        frozen = {k: v.detach() for k, v in self.critic.named_parameters()}
        adv = -torch.func.functional_call(self.critic, frozen, (recon,)).mean()
        total = rec + critic_loss + (adv_weight * adv if adv_weight else 0.0)
        return total, {"loss": rec.detach(), "critic_loss": critic_loss.detach(), "adv_loss": adv.detach()}


# --------------------------------------------------------------------------------------------------
# The transformer
# --------------------------------------------------------------------------------------------------


def _progress(tcfg, dist: Dist, start: int, what: str):
    if not (tcfg.progress and dist.main):
        return None
    return progress_bar(total=tcfg.steps, initial=start, desc=f"train {what}", unit="step")


def train_model(train: LatentClips, out: str | Path, cfg: ModelConfig, tcfg: ModelTrainConfig,
                autoencoder: Autoencoder | None = None, val: LatentClips | None = None,
                val_frames: FrameClips | None = None, resume: bool = False, info: dict | None = None,
                on_step=None) -> dict:
    """Train the transformer of `cfg` on cached latent clips. `autoencoder` (frozen) is needed for the
    teacher-forced PSNR / sample strips on `val_frames` and for the export; `val` gives the validation
    loss. Works as one process or under torchrun (DDP). `on_step(step, loss)` is called after every
    step (tests use it to kill a run). Returns a summary with the losses of the steps run."""
    out = Path(out)
    # under torchrun the process group stays up for the rest of the process (the CLI closes it)
    return _train_model(train, out, cfg, tcfg, autoencoder, val, val_frames, resume, info or {}, on_step,
                        setup_distributed(tcfg.device))


def _train_model(train, out, cfg, tcfg, autoencoder, val, val_frames, resume, info, on_step, dist: Dist) -> dict:
    device = dist.device
    F_ = tcfg.frames(cfg)
    if train.clip_frames != F_:
        train = train.with_clip_frames(F_)
    if val is not None and val.clip_frames != F_:
        val = val.with_clip_frames(F_)
    for clips in (train, val):
        if isinstance(clips, LatentClips) and tuple(clips.latents.shape[1:]) != cfg_latent(cfg):
            raise UserError(f"latents are {tuple(clips.latents.shape[1:])}, the model expects {cfg_latent(cfg)}")
    if tcfg.batch % dist.world:
        raise UserError(f"--batch {tcfg.batch} is not divisible by the {dist.world} processes")
    if F_ < 2:
        raise UserError("clips need at least 2 frames")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(tcfg.seed)
    model = WorldTransformer(cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tcfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tcfg.lr, betas=(0.9, tcfg.beta2),
                            fused=device.type == "cuda" or None)
    start, elapsed, last_val = 0, 0.0, {}
    ckpts = checkpoint_dirs(out) if resume else []
    if ckpts:
        state = load_checkpoint(ckpts[-1], {"model": model, "ema": ema}, opt)
        start, elapsed = state["step"], state.get("elapsed_s", 0.0)
        last_val = state.get("last_val") or {}
        if dist.main:
            _trim_metrics(out, start)
            print(f"resuming from {ckpts[-1]} (step {start})", file=sys.stderr)
    else:
        if tcfg.init:
            init_from(model, tcfg.init, cfg)
            ema.load_state_dict(model.state_dict())
        if dist.main:
            (out / "metrics.jsonl").unlink(missing_ok=True)
    if dist.main:
        atomic_write_json(out / "config.json", {"kind": "model", "model": cfg.to_dict(), "train": asdict(tcfg),
                                                "clip_frames": F_, "world_size": dist.world,
                                                "train_clips": len(train), "val_clips": len(val) if val else 0,
                                                **info})
    net: nn.Module = model
    if dist.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if tcfg.compile:
        net = torch.compile(net)
    amp = amp_enabled(tcfg.amp, device)
    log = MetricsLog(out, dist.main)
    b = tcfg.batch // dist.world
    lo, hi = dist.rank * b, (dist.rank + 1) * b
    steps_eval = tcfg.sample_steps or cfg.sample_steps
    sf_steps = steps_eval if tcfg.self_forcing else 0  # the rollout samples as the engine does
    # 1..sf_real_max real frames start the rollout; at least one target frame follows the self-made ones
    sf_real_max = min(cfg.cache_frames, F_ - tcfg.self_forcing - 1)
    if tcfg.self_forcing and sf_real_max < 1:
        raise UserError(f"--self-forcing {tcfg.self_forcing}: a {F_}-frame clip has no room for a real frame, "
                        f"{tcfg.self_forcing} self-made ones and a target")
    losses: list[float] = []
    hw = hardware(device)

    def evaluate(step: int) -> dict:
        res: dict = {}
        if val is not None and len(val):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                res["val_loss"] = validation_loss(model.eval(), val, tcfg.val_clips, b * 2, tcfg.seed, device,
                                                  tcfg.context_prob, tcfg.context_max)
                res["val_loss_ema"] = validation_loss(ema, val, tcfg.val_clips, b * 2, tcfg.seed, device,
                                                      tcfg.context_prob, tcfg.context_max)
            model.train()
        if autoencoder is not None and val_frames is not None and len(val_frames):
            ae = autoencoder.to(device).eval()
            n = min(tcfg.eval_clips, len(val_frames))
            fr, ac = val_frames.clip(torch.arange(n))
            tf = teacher_forced(ema, ae, cfg, fr, ac, steps_eval, seed=tcfg.seed)
            tf1 = teacher_forced(ema, ae, cfg, fr, ac, 1, seed=tcfg.seed)
            res.update({"psnr_tf": tf["psnr"], "psnr_tf_1step": tf1["psnr"], "psnr_copy_last": tf["psnr_copy_last"],
                        "psnr_ae": tf["psnr_ae"], "psnr_pooled_tf": tf["psnr_pooled"],
                        "psnr_pooled_copy_last": tf["psnr_pooled_copy_last"], "eval_clips": n,
                        "sample_steps": steps_eval})
            image, stats = sample_strip(ema, ae, cfg, fr[:2], ac[:2], steps_eval, seed=tcfg.seed)
            save_png(out / "samples" / f"step_{step:08d}.png", image)
            save_png(out / "samples" / "latest.png", image)
            res.update(stats)
        return res

    def do_export(step: int) -> None:
        if autoencoder is None:
            return
        summary = {"training": {"maps": train.maps, "frames": int(train.frames), "clips": len(train),
                                "clip_frames": F_, "frames_seen": step * tcfg.batch * F_, "steps": step, "batch": tcfg.batch, "world_size": dist.world,
                                "hardware": hw, "time_s": round(elapsed, 1), "lr": tcfg.lr, "ema_decay": tcfg.ema_decay,
                                "validation_maps": val.maps if val is not None else [],
                                **{k: v for k, v in info.items() if k != "level"}},
                   "validation": last_val, "steps": step}
        if "level" in info:  # a level model: what play, record, bench and eval read (`info.level`)
            summary["level"] = info["level"]
        export(out, cfg, autoencoder, ema, summary)

    bar = _progress(tcfg, dist, start, "model")
    window_t, n_since = 0.0, 0
    t_process = time.perf_counter()
    stopped = None
    model.train()
    for step in range(start, tcfg.steps):
        t_step = time.perf_counter()
        lr = lr_at(step, tcfg.lr, tcfg.warmup, tcfg.steps, tcfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        # the global batch of this step (data, noise levels, noise), of which this rank takes its slice
        x0, a = train.batch(step, tcfg.batch, lo, hi, tcfg.seed)
        g = step_generator(tcfg.seed, step, stream=3)
        weight = None
        g_sf = step_generator(tcfg.seed, step, stream=4)
        if sf_steps and torch.rand((), generator=g_sf) < tcfg.self_forcing_prob:
            # Self Forcing: k context frames are the model's own rollout from `real` real ones
            real = int(torch.randint(1, sf_real_max + 1, (), generator=g_sf))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                x0 = self_forced_clip(model, cfg, x0.to(device), a.to(device), real, tcfg.self_forcing, sf_steps,
                                      seed=tcfg.seed * 1_000_003 + step)
            t, weight = self_forcing_layout(tcfg.batch, F_, real, tcfg.self_forcing, tcfg.context_max, g,
                                            tcfg.noise_shift)
            weight = weight[lo:hi].to(device)
        else:
            t = diffusion.sample_training_noise_levels(tcfg.batch, F_, g, context_prob=tcfg.context_prob,
                                                       context_max=tcfg.context_max, shift=tcfg.noise_shift)
        noise = torch.randn((tcfg.batch, *x0.shape[1:]), generator=g)[lo:hi]
        x0, a, t, noise = x0.to(device), a.to(device), t[lo:hi].to(device), noise.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = diffusion.flow_matching_loss(net, x0, a, t, noise, weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip) if tcfg.grad_clip else torch.zeros(())
        opt.step()
        ema_update(ema, model, tcfg.ema_decay, step)
        loss_v = dist.mean(loss.detach().float()).item()
        if not math.isfinite(loss_v):
            raise RuntimeError(f"training diverged at step {step + 1}: loss {loss_v}")
        losses.append(loss_v)
        dt = time.perf_counter() - t_step  # training time only: evaluation and checkpoints excluded
        elapsed, window_t, n_since = elapsed + dt, window_t + dt, n_since + tcfg.batch
        done = step + 1
        if on_step is not None:
            on_step(done, loss_v)
        if done % tcfg.log_every == 0 or done == tcfg.steps:
            rate = n_since / max(window_t, 1e-9)
            window_t, n_since = 0.0, 0
            log.write(step=done, loss=loss_v, lr=lr, grad_norm=float(gnorm), clips_per_s=rate)
            if bar is not None:
                bar.set_postfix(loss=f"{loss_v:.4f}", clips_s=f"{rate:.2f}",
                                refresh=False, **({"val": f"{last_val['val_loss']:.4f}"} if "val_loss" in last_val else {}))
        if bar is not None:
            bar.update(1)
        if done % tcfg.val_every == 0 or done == tcfg.steps:
            if dist.main:
                last_val = evaluate(done)
                if last_val:
                    log.write(step=done, **last_val)
                    log.plot()
                    if bar is not None:
                        bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                              for k, v in last_val.items()))
            dist.barrier()
        out_of_time = bool(tcfg.max_time) and _flag(time.perf_counter() - t_process >= tcfg.max_time)
        if done % tcfg.ckpt_every == 0 or done == tcfg.steps or out_of_time:
            if dist.main:
                save_checkpoint(out, done, {"model": model, "ema": ema}, opt,
                                {"elapsed_s": elapsed, "kind": "model", "world_size": dist.world,
                                 "data_position": {"clips_seen": done * tcfg.batch, "epoch": done * tcfg.batch // len(train),
                                                   "seed": tcfg.seed}, "last_val": last_val},
                                tcfg.keep_checkpoints)
                do_export(done)
            dist.barrier()
        if out_of_time:
            stopped = done
            if dist.main:
                print(f"\nworldmodel train: --max-time {tcfg.max_time:g} s reached at step {done} of {tcfg.steps}; "
                      f"checkpointed and exported (--resume continues)", file=sys.stderr)
            break
    if bar is not None:
        bar.close()
    if start >= tcfg.steps and dist.main and resume:  # a finished run resumed: export it again
        do_export(start)
    return {"steps": stopped or tcfg.steps, "start_step": start, "losses": losses, "time_s": round(elapsed, 1),
            "validation": last_val, "world_size": dist.world, "export": str(out / "export") if autoencoder else None,
            "model": model, "ema": ema}


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


# what a training run writes in its folder: `--overwrite` deletes these (cache/ stays: a latent cache is
# reused only when it was made from the same data and autoencoder)
RUN_FILES = (CONFIG_FILE, "train_config.json", AE_FILE, "metrics.jsonl", "curves.png", "checkpoints", "samples",
             "export")
# training settings that a resumed run may change; any other must be the run's own
RESUME_MAY_CHANGE = {"steps", "max_time", "log_every", "val_every", "ckpt_every", "keep_checkpoints", "val_frames",
                     "calibrate_frames", "val_clips", "eval_clips", "sample_steps", "init", "compile", "amp",
                     "device", "progress"}


def claim_run_folder(out: Path, kind: str, cfg: ModelConfig, tcfg, resume: bool, overwrite: bool,
                     main: bool = True) -> None:
    """Before any work, `train autoencoder|model --out OUT`: a folder that holds another run is refused
    (its checkpoints would mix with the new run's, its export be replaced), unless --resume continues it
    with the same model and training settings, or --overwrite replaces it (its files are deleted here,
    by the main process)."""
    check_output_path(out, folder=True)
    found = [name for name in RUN_FILES if (out / name).exists()]
    if not found:
        return
    if overwrite:
        for name in found if main else []:
            if (out / name).is_dir():
                shutil.rmtree(out / name)
            else:
                (out / name).unlink()
        return
    if not resume:
        raise UserError(f"{out} holds another run ({', '.join(found)}): pass --resume to continue it, or "
                        f"--overwrite to replace it")
    stored_file = out / ("train_config.json" if kind == "autoencoder" else CONFIG_FILE)
    try:
        stored = json.loads(stored_file.read_text())
    except (OSError, ValueError):
        raise UserError(f"{out}: {stored_file.name} is missing or unreadable, so the run there cannot be "
                        f"resumed; pass --overwrite to replace it") from None
    if stored.get("kind") != kind:
        raise UserError(f"{out} holds a `train {stored.get('kind', '?')}` run, not a `train {kind}` run: pass "
                        f"--overwrite to replace it, or another --out")
    now = json.loads(json.dumps({"model": cfg.to_dict(), "train": asdict(tcfg)}, default=str))

    def shown(v) -> str:
        return ",".join(map(str, v)) if isinstance(v, list) else str(v)

    diff = [f"--set {k}={shown(v)}" if part == "model" else f"--{k.replace('_', '-')} {shown(v)}"
            for part in ("model", "train") for k, v in stored.get(part, {}).items()
            if k not in RESUME_MAY_CHANGE and now[part].get(k, v) != v]
    if diff:
        raise UserError(f"{out}: the run there was started with {', '.join(diff)}; resume it with the same "
                        f"settings, or pass --overwrite to replace it")


def parse_overrides(items: list[str] | None) -> dict:
    """['dim=128', 'frame_size=48,64'] -> {'dim': 128, 'frame_size': [48, 64]}"""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE")
        try:
            v = json.loads(value)
        except json.JSONDecodeError:
            if "," in value:
                try:
                    v = [json.loads(x) for x in value.split(",")]
                except json.JSONDecodeError:
                    raise UserError(f"--set {item!r}: bad value") from None
            else:
                v = value
        out[key.strip()] = v
    return out


def resolve_config(name: str, overrides: dict, base: dict | None = None) -> ModelConfig:
    d = preset(name).to_dict()
    d.update(base or {})
    d.update(overrides)
    try:
        return ModelConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise UserError(f"bad model config: {e}") from None


def _add_common(p: argparse.ArgumentParser, defaults) -> None:
    p.add_argument("--data", required=True, help="dataset folder (training maps MAP01-MAP20 are used)")
    p.add_argument("--val-data", default=None,
                   help="dataset folder with validation maps MAP21-MAP24 (default: --data, its validation maps)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--preset", default="tiny", help="model preset (tiny, small, nfd-310m)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a model config field (repeatable)")
    p.add_argument("--maps", default=None, help="training maps to use, e.g. MAP01-MAP05 (default: all in the data)")
    p.add_argument("--max-frames", type=int, default=None,
                   help="use about this many training frames, spread over the dataset (reading, or for the model "
                        "encoding, every frame of a large dataset takes long on a CPU)")
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch", type=int, default=defaults.batch, help="global batch (split over torchrun processes)")
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--warmup", type=int, default=defaults.warmup)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--val-every", type=int, default=defaults.val_every)
    p.add_argument("--ckpt-every", type=int, default=defaults.ckpt_every)
    p.add_argument("--log-every", type=int, default=defaults.log_every)
    again = p.add_mutually_exclusive_group()  # a run folder that holds a run is refused without one of these
    again.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its newest checkpoint (the same settings; steps may grow)")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the run in --out: its checkpoints, metrics, samples and export are deleted")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    a = sub.add_parser("autoencoder", help="train the frame autoencoder",
                       description="Train the frame autoencoder; PSNR on validation maps; calibrates latent statistics.")
    _add_common(a, AutoencoderTrainConfig())
    a.add_argument("--val-frames", type=int, default=512, help="validation frames for PSNR")
    a.add_argument("--crop", default=None, metavar="HxW",
                   help="train on random crops of this size (e.g. 48x64: about 4x faster per frame)")
    a.add_argument("--adv-weight", type=float, default=0.0,
                   help="> 0: train a PatchGAN critic beside it and add this weight times the adversarial loss "
                        "(sharper reconstructions; default 0: L1 + MSE only)")
    a.add_argument("--adv-start", type=int, default=0, help="step from which the adversarial loss applies")
    a.add_argument("--init", default=None, metavar="AUTOENCODER",
                   help="start from this autoencoder's weights (a run folder, its .safetensors or a checkpoint folder)")
    a.add_argument("--decoder-only", action="store_true",
                   help="with --init: train the decoder alone (the encoder and its latents stay exactly as they "
                        "are, so a transformer trained on them still fits); e.g. a sharper decoder with --adv-weight")
    a.set_defaults(_train=run_autoencoder)
    m = sub.add_parser("model", help="train the diffusion transformer",
                       description="Train the block-causal diffusion transformer on latents of the frozen autoencoder.")
    d = ModelTrainConfig()
    _add_common(m, d)
    m.add_argument("--autoencoder", required=True, help="`train autoencoder` run folder, its .safetensors file, "
                                                        "or a checkpoint folder")
    m.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start a new run from this checkpoint's transformer weights (e.g. checkpoints/doom-tiny)")
    m.add_argument("--ema-decay", type=float, default=d.ema_decay)
    m.add_argument("--grad-clip", type=float, default=d.grad_clip)
    m.add_argument("--weight-decay", type=float, default=d.weight_decay)
    m.add_argument("--clip-frames", type=int, default=0, help="training clip length (default: the model's clip_frames)")
    m.add_argument("--self-forcing", type=int, default=d.self_forcing, metavar="K",
                   help="Self Forcing: on a share of the steps (--self-forcing-prob), K context frames are the "
                        "model's own rollout (the engine's sampler and KV cache, from real frames, fed the real "
                        "actions) and the frames after them are trained against the real game (default 0: off)")
    m.add_argument("--self-forcing-prob", type=float, default=d.self_forcing_prob,
                   help="share of self-forced steps (default %(default)s)")
    m.add_argument("--context-prob", type=float, default=d.context_prob)
    m.add_argument("--context-max", type=float, default=d.context_max)
    m.add_argument("--noise-shift", type=float, default=d.noise_shift,
                   help="bias training noise levels towards pure noise (SD3 shift; 1 = none)")
    m.add_argument("--val-clips", type=int, default=d.val_clips)
    m.add_argument("--eval-clips", type=int, default=d.eval_clips,
                   help="validation clips for teacher-forced PSNR (one frame ahead of a full context)")
    m.add_argument("--rollout-frames", type=int, default=8,
                   help="frames generated after the context in the sample strip")
    m.add_argument("--max-clips", type=int, default=None, help="use at most this many training clips (evenly spaced)")
    m.add_argument("--clip-stride", type=int, default=1, help="frames between the starts of training clips")
    m.add_argument("--no-cache", action="store_true",
                   help="encode clips from the dataset loader at every step instead of caching latents")
    m.add_argument("--compile", action="store_true", help="torch.compile the model")
    m.add_argument("--max-time", type=float, default=0.0, metavar="SECONDS",
                   help="stop after this many seconds of training (checkpointed and exported; --resume continues): "
                        "a run that uses the time there is, e.g. a lent GPU's minutes")
    add_amp_argument(m)
    m.set_defaults(_train=run_model)
    b = sub.add_parser("throughput", help="measure training throughput (clips/s) on random latents",
                       description="Time full training steps of the transformer on random latents of the "
                                   "preset's shape (no data needed) and report clips/s.")
    b.add_argument("--preset", default="tiny")
    b.add_argument("--set", action="append", metavar="KEY=VALUE")
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--steps", type=int, default=10, help="timed steps")
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--clip-frames", type=int, default=0)
    b.add_argument("--device", default="auto")
    b.add_argument("--threads", type=int, default=0)
    b.add_argument("--compile", action="store_true")
    add_amp_argument(b)
    b.add_argument("--out", default=None, help="write the result as JSON here")
    b.set_defaults(_train=run_throughput)


def measure_throughput(cfg: ModelConfig, batch: int, steps: int = 10, warmup: int = 3, device: str = "auto",
                       compile: bool = False, amp: bool = True, clip_frames: int = 0, device_data: bool = False,
                       on_step=None) -> dict:
    """Training throughput of the transformer in clips/s: full steps (noise levels, forward, backward,
    clipping, AdamW, EMA) on random latents of the model's shape -- the same work as on real data,
    where each step's noise levels and noise are drawn on the host and copied over, as in `train
    model`. `device_data`: draw them on the device instead (the device's work alone). `on_step(i)` is
    called after each step (a profiler's step)."""
    dev = resolve_device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    F_ = clip_frames or cfg.clip_frames
    torch.manual_seed(0)
    model = WorldTransformer(cfg).to(dev)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda" or None)
    net = torch.compile(model) if compile else model
    use_amp = amp_enabled(amp, dev)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, F_, *cfg_latent(cfg), generator=g).to(dev)
    a = torch.randn(batch, F_, cfg.action_dim, generator=g).to(dev)
    data_dev = dev if device_data else torch.device("cpu")
    g_data = torch.Generator(device=data_dev).manual_seed(1)
    times = []
    for i in range(warmup + steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        t = diffusion.sample_training_noise_levels(batch, F_, g_data, device=data_dev).to(dev)
        noise = torch.randn(x0.shape, generator=g_data, device=data_dev).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = diffusion.flow_matching_loss(net, x0, a, t, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, 0.999, i)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if on_step is not None:
            on_step(i)
    times.sort()
    med = times[len(times) // 2]
    return {"clips_per_s": batch / med, "clips_per_s_mean": batch * len(times) / sum(times),
            "step_s_median": med, "step_s_min": times[0], "batch": batch, "clip_frames": F_,
            "tokens_per_clip": F_ * cfg.tokens_per_frame, "steps_timed": steps, "warmup_steps": warmup,
            "params": sum(p.numel() for p in model.parameters()), "device": hardware(dev),
            "device_type": dev.type, "threads": torch.get_num_threads(), "compile": compile,
            "amp_bf16": use_amp, "data": "device" if device_data else "host", "torch": torch.__version__,
            "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "cpu_count": os.cpu_count()}


def run_throughput(args) -> int:
    check_sizes(args, at_least_1=("batch", "steps"), at_least_0=("warmup", "clip_frames"))
    if args.out:
        check_output_path(args.out)
    cfg = resolve_config(args.preset, parse_overrides(args.set))
    r = measure_throughput(cfg, args.batch, args.steps, args.warmup, args.device, args.compile, not args.no_amp,
                           args.clip_frames)
    try:
        import subprocess
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except OSError:
        commit = None
    r = {"preset": args.preset, "overrides": parse_overrides(args.set), **r, "commit": commit,
         "command": "worldmodel " + " ".join(sys.argv[1:]) if sys.argv and "worldmodel" in sys.argv[0]
         else None, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print(f"{args.preset}: {r['clips_per_s']:.2f} clips/s ({r['batch']} clips of {r['clip_frames']} frames, "
          f"{r['step_s_median']:.3f} s a step) on {r['device']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(args.out), r)
    return 0


def run(args) -> int:
    check_sizes(args, at_least_0=("threads",))
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return args._train(args)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _maps(args) -> list[str] | None:
    if not args.maps:
        return None
    from worldmodel.game.maps import parse_maps
    return parse_maps(args.maps)


def _val_source(args) -> str:
    return args.val_data or args.data


def run_autoencoder(args) -> int:
    cfg = resolve_config(args.preset, parse_overrides(args.set))
    tcfg = AutoencoderTrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup, seed=args.seed,
                                  val_every=args.val_every, ckpt_every=args.ckpt_every, log_every=args.log_every,
                                  val_frames=args.val_frames, device=args.device, progress=not args.no_progress,
                                  crop=parse_hw(args.crop, "48x64") if args.crop else None, adv_weight=args.adv_weight,
                                  adv_start=args.adv_start, init=args.init, decoder_only=args.decoder_only)
    if tcfg.adv_weight < 0 or tcfg.adv_start < 0:
        raise UserError("--adv-weight and --adv-start must not be negative")
    check_sizes(args, at_least_1=("max_frames",))
    main = int(os.environ.get("RANK", "0")) == 0
    claim_run_folder(Path(args.out), "autoencoder", cfg, tcfg, args.resume, args.overwrite, main)
    progress = tcfg.progress and main
    frames, maps = read_frames(args.data, "train", _maps(args), args.max_frames, progress)
    val_frames = None
    try:
        val_frames, _ = read_frames(_val_source(args), "val", None, tcfg.val_frames, progress)
    except UserError as e:
        if main:
            print(f"worldmodel train: no validation frames ({e}); PSNR is not measured", file=sys.stderr)
    info = {"data": str(args.data), "maps": maps, "val_data": _val_source(args) if val_frames is not None else None}
    s = train_autoencoder(frames, args.out, cfg, tcfg, val_frames, resume=args.resume, info=info)
    if main:
        where = f"autoencoder: {Path(args.out) / AE_FILE} ({len(frames)} frames, {tcfg.steps} steps)"
        if "val_psnr" in s:
            print(f"{where}; validation PSNR {s['val_psnr']:.2f} dB on {s['val_frames']} frames, sharpness "
                  f"(median Laplacian variance) {s['val_sharpness']:.0f} vs {s['val_sharpness_real']:.0f} real")
        else:
            print(f"{where}; no validation frames")
    return 0


def _flag(ok: bool) -> bool:
    """Rank 0's `ok`, on every rank."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return ok
    t = torch.tensor([1 if ok else 0])
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.broadcast(t, 0)
    return bool(t.item())


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
    if not _flag(error is None):
        raise error or UserError(f"{data}: no usable {split} data (see rank 0)")
    if clips is None:
        clips = LatentClips.load(cache, meta)
        if clips is None:
            raise UserError(f"{cache}: the latent cache could not be read")
    return clips, None


def run_model(args) -> int:
    if args.max_time < 0:
        raise UserError(f"--max-time must not be negative, got {args.max_time:g}")
    if args.self_forcing < 0 or not 0.0 <= args.self_forcing_prob <= 1.0:
        raise UserError(f"--self-forcing must be >= 0 and --self-forcing-prob within 0..1, got {args.self_forcing} "
                        f"and {args.self_forcing_prob:g}")
    ae, ae_config = load_autoencoder(args.autoencoder)
    ae_model = ae_config.get("model")
    base = {}
    if isinstance(ae_model, dict):  # the autoencoder's shape, unless --set overrides it
        base = {k: ae_model[k] for k in ("frame_size", "latent_channels", "ae_channels", "ae_res_blocks") if k in ae_model}
    cfg = resolve_config(args.preset, parse_overrides(args.set), base)
    if _ae_shape(cfg.autoencoder) != _ae_shape(ae.cfg):
        raise UserError(f"{args.autoencoder}: the autoencoder {_ae_shape(ae.cfg)} does not match the model config "
                        f"{_ae_shape(cfg.autoencoder)}")
    rank = int(os.environ.get("RANK", "0"))
    tcfg = ModelTrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup, seed=args.seed,
                            val_every=args.val_every, ckpt_every=args.ckpt_every, log_every=args.log_every,
                            ema_decay=args.ema_decay, grad_clip=args.grad_clip, weight_decay=args.weight_decay,
                            clip_frames=args.clip_frames, init=args.init, context_prob=args.context_prob, context_max=args.context_max,
                            noise_shift=args.noise_shift, self_forcing=args.self_forcing,
                            self_forcing_prob=args.self_forcing_prob,
                            val_clips=args.val_clips, eval_clips=args.eval_clips, compile=args.compile,
                            max_time=args.max_time,
                            amp=not args.no_amp, device=args.device, progress=not args.no_progress)
    check_sizes(args, at_least_1=("max_clips", "clip_stride", "rollout_frames"))
    claim_run_folder(Path(args.out), "model", cfg, tcfg, args.resume, args.overwrite, rank == 0)
    if rank == 0 and bool((ae.latent_std == 1).all() and (ae.latent_mean == 0).all()):
        print("worldmodel train: warning: the autoencoder's latent statistics are not calibrated", file=sys.stderr)
    F_ = tcfg.frames(cfg)
    progress = tcfg.progress and rank == 0
    dist = setup_distributed(tcfg.device)  # the cache step needs the process group; train_model reuses it
    ae_file = Path(args.autoencoder) / AE_FILE if Path(args.autoencoder).is_dir() else Path(args.autoencoder)
    if not ae_file.is_file():  # a checkpoint folder
        ae_file = Path(args.autoencoder) / WEIGHT_FILES["autoencoder"]
    ae = ae.to(dist.device)
    maps = split_maps("train", _maps(args), args.data)
    if args.no_cache:
        train = OnlineClips(args.data, ae, F_, maps, args.seed, args.clip_stride)
    else:
        train, _ = prepare_latents(ae, file_digest(ae_file), args.data, "train", F_, _maps(args), args.clip_stride,
                                   args.max_clips, Path(args.out), rank, progress, args.max_frames)
    val, val_frames = None, None
    try:
        val, _ = prepare_latents(ae, file_digest(ae_file), _val_source(args), "val", F_, None, 1,
                                 tcfg.val_clips, Path(args.out), rank, progress)
        if rank == 0 and tcfg.eval_clips:  # context + the next frames, for PSNR and the sample strip
            val_frames = read_eval_clips(_val_source(args), tcfg.eval_clips,
                                         cfg.cache_frames + args.rollout_frames, seed=args.seed)
    except UserError as e:
        if rank == 0:
            print(f"worldmodel train: no validation data ({e}); no validation loss or samples", file=sys.stderr)
    info = {"data": str(args.data), "val_data": _val_source(args) if val is not None else None,
            "autoencoder": str(args.autoencoder), "autoencoder_info": ae_config.get("info", {})}
    level = level_dataset(args.data)
    if level is not None:  # a level model: play, record, bench and eval default to its level
        info["level"] = {"wad": level["wad"], "map": level["map"]}
    s = train_model(train, args.out, cfg, tcfg, ae, val, val_frames, resume=args.resume, info=info)
    if rank == 0:
        v = s["validation"]
        line = f"model: {Path(args.out) / 'export'} after {s['steps']} steps"
        if "psnr_tf" in v:
            line += (f"; teacher-forced next-frame PSNR on validation maps {v['psnr_tf']:.2f} dB "
                     f"({v['sample_steps']} steps), {v['psnr_tf_1step']:.2f} dB (1 step); copy-last-frame "
                     f"{v['psnr_copy_last']:.2f} dB; autoencoder {v['psnr_ae']:.2f} dB")
        print(line)
    return 0
