"""The fixed map split: what may be trained on, what is validation, what is held out. It covers the
two Freedoom IWADs; a user's own WAD file (a level they made or downloaded) is outside it: its maps are
"user" maps, open to every purpose."""
from __future__ import annotations

import argparse
from pathlib import Path

WADS = ("freedoom1", "freedoom2")
TRAIN_MAPS = tuple(f"MAP{i:02d}" for i in range(1, 21))  # freedoom2 MAP01-MAP20
VAL_MAPS = tuple(f"MAP{i:02d}" for i in range(21, 25))  # freedoom2 MAP21-MAP24
TEST_MAPS = tuple(f"MAP{i:02d}" for i in range(25, 33))  # freedoom2 MAP25-MAP32: held out
FREEDOOM1_MAPS = tuple(f"E{e}M{m}" for e in range(1, 5) for m in range(1, 10))  # all held out

PURPOSES = ("train", "val", "any")


def is_user_wad(wad: str) -> bool:
    """A user's WAD file (a path), rather than one of the Freedoom IWADs that ship with vizdoom."""
    return wad not in WADS


def add_wad_argument(parser: argparse.ArgumentParser, more: str = "", default: str | None = "freedoom2") -> None:
    """The --wad option, shared by every command that starts the game."""
    parser.add_argument("--wad", type=parse_wad, default=default,
                        help="freedoom2, freedoom1, or your own .wad file (loaded on top of freedoom2)"
                             + (f"; default {default}" if default else "") + more)


def parse_wad(spec: str) -> str:
    """--wad: freedoom2, freedoom1, or the path of a .wad file (resolved); an argparse error otherwise."""
    if spec in WADS:
        return spec
    p = Path(spec)
    if p.suffix.lower() != ".wad" or not p.is_file():
        raise argparse.ArgumentTypeError(f"{spec!r} is neither {' nor '.join(WADS)} nor a .wad file")
    return str(p.resolve())


class HeldOutMapError(ValueError):
    pass


def split_of(wad: str, map_name: str) -> str:
    """'train', 'val', 'heldout', or 'user' for any map of a user's WAD file (the engine tells whether it
    exists); ValueError for a Freedoom map that does not exist."""
    map_name = map_name.upper()
    if is_user_wad(wad):
        return "user"
    if wad == "freedoom2":
        if map_name in TRAIN_MAPS:
            return "train"
        if map_name in VAL_MAPS:
            return "val"
        if map_name in TEST_MAPS:
            return "heldout"
    elif map_name in FREEDOOM1_MAPS:
        return "heldout"
    raise ValueError(f"{wad} has no map {map_name!r}")


def check_map(wad: str, map_name: str, purpose: str) -> str:
    """Refuse maps a purpose may not use: 'train' allows only training maps, 'val' training or
    validation maps; 'any' (playing, recording) allows every map. Returns the normalised map name."""
    split = split_of(wad, map_name)
    allowed = {"train": ("train", "user"), "val": ("train", "val", "user"), "any": ("train", "val", "heldout", "user")}[purpose]
    if split not in allowed:
        what = "training" if purpose == "train" else "evaluation or tuning"
        raise HeldOutMapError(
            f"{wad} {map_name.upper()} is a {'held-out' if split == 'heldout' else split} map and may not be "
            f"used for {what} (training: freedoom2 MAP01-MAP20, validation: MAP21-MAP24)")
    return map_name.upper()


def parse_maps(spec: str) -> list[str]:
    """'MAP01,MAP02' or 'MAP01-MAP05' (or a mix) -> list of map names."""
    out: list[str] = []
    for part in spec.split(","):
        part = part.strip().upper()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            if not (a.startswith("MAP") and b.startswith("MAP")):
                raise ValueError(f"bad map range {part!r}; use e.g. MAP01-MAP05")
            lo, hi = int(a[3:]), int(b[3:])
            out.extend(f"MAP{i:02d}" for i in range(lo, hi + 1))
        else:
            out.append(part)
    if not out:
        raise ValueError("no map given")
    return out
