"""`worldmodel data`: dataset tools: `verify` (worldmodel/data/verify.py), `preview` (a grid of frames),
`start-clips` (the start scenes a checkpoint ships, so that playing needs no dataset)."""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
from pathlib import Path
from typing import Iterable

import numpy as np

from worldmodel.data.dataset import SHARD_DIR, DatasetError, ShardCache, load_manifest, load_shard, run_bounds
from worldmodel.data.verify import verify_dataset
from worldmodel.errors import UserError
from worldmodel.files import atomic_write_bytes, check_output_path


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
        for start, end in run_bounds(small["episode"]):
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
