"""Writing a gameplay dataset (format: worldmodel/data/dataset.py): shards and the manifest, each written
atomically (a temporary name in the same directory, fsynced, renamed over the final name), and the
temporary files of a killed writer removed."""
from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from worldmodel.data.dataset import (ACTION_CONVENTION, FORMAT, FPS, MANIFEST, SHARD_DIR, VERSION, DatasetError,
                                     check_arrays, episode_runs)
from worldmodel.game.action import ACTION_DIM, FIELDS, TURN_MAX
from worldmodel.files import atomic_write_bytes, atomic_write_json, is_temp_file


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
    arrays = check_arrays(arrays, "<new shard>")
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


def write_shard(root: str | Path, name: str, arrays: dict) -> dict:
    """Write a shard atomically under root and return its manifest entry. name: e.g. 'shards/x.npz'."""
    arrays = check_arrays(arrays, name)
    data = encode_shard(arrays)
    atomic_write_bytes(Path(root) / name, data)
    return shard_entry(name, data, arrays)


def shard_entry(name: str, data: bytes, arrays: dict) -> dict:
    return {"name": name, "frames": int(len(arrays["frames"])), "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "episodes": episode_runs(arrays["episode"], arrays["frame_index"], name),
            "maps": sorted(set(arrays["map"].tolist()))}


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
