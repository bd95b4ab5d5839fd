"""A level's walkable area, read from the game itself: a grid of cells, coverage of player positions,
and the start places of a level model's episodes (training and evaluation apart by construction).

The geometry comes from ViZDoom's sector information (`set_sectors_info_enabled`): every sector's
floor and ceiling heights and its lines. A sector is *reachable* if it is connected to the player
start's sector through lines that do not block the player. Heights do not cut the flood: a step too
high to climb is usually the top of a lift (the level's upper areas are reached that way), and a
sector too low to stand in is usually a door. Teleporters are not followed, so a place reachable only
through one counts as unreachable. The level is cut into square cells of `CELL` map units; a cell is
reachable when its centre lies in a reachable sector, and a *start cell* (a warp target) when, in
addition, the player can stand there (`PLAYER_HEIGHT` of room) with flat floor `START_MARGIN` units
around the centre.

Coverage (`Level.coverage(positions)`) is measured from the game's own player positions (the
`position` array of every dataset shard): the share of reachable cells visited, and how evenly the
frames are spread over them.

Start places. A level model is evaluated on episodes that training never used (docs/architecture.md, "Map
split"). Both come from here: `Level.starts("eval")` is a fixed set of `EVAL_STARTS` cells spread
over the whole level (farthest-point sampling, deterministic); `Level.starts("train")` is every other
start cell that is not next to one of them. Episode seeds are apart too: `episode_seed` gives training
episodes even engine seeds and evaluation episodes odd ones.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np

from worldmodel.errors import UserError

CELL = 64  # map units a cell side: four tics of running
PLAYER_HEIGHT = 56  # Doom's player height: less room than this and a sector cannot be entered
STEP = 24  # highest step up the player climbs: a start cell's floor is flat to within this
START_MARGIN = 24  # a start cell's centre and the four points this far from it lie in reachable sectors
EVAL_STARTS = 24  # start places of a level's evaluation episodes
SPLITS = ("train", "eval")


def episode_seed(split: str, value: int) -> int:
    """An engine seed for an episode of `split`, below 2**32: even for training, odd for evaluation,
    so no evaluation episode can ever be a training episode."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return (int(value) % 2 ** 31) * 2 + (1 if split == "eval" else 0)


@dataclass(eq=False)
class Level:
    """The walkable grid of one map. `origin` is the map coordinate (x, y) of cell (0, 0)'s corner;
    cell (row, col) spans x in [x0 + col*cell, ...), y in [y0 + row*cell, ...)."""

    wad: str
    map: str
    cell: int
    origin: tuple[float, float]
    reachable: np.ndarray  # (rows, cols) bool: cells whose centre lies in a reachable sector
    start_ok: np.ndarray  # (rows, cols) bool: reachable cells with room around the centre (warp targets)
    player_start: tuple[float, float]

    def __post_init__(self):
        self._starts: dict[str, np.ndarray] | None = None  # made on first use (`starts`)

    @property
    def shape(self) -> tuple[int, int]:
        return self.reachable.shape

    @property
    def reachable_cells(self) -> int:
        return int(self.reachable.sum())

    def centre(self, cells: np.ndarray) -> np.ndarray:
        """(N, 2) integer (row, col) -> (N, 2) map (x, y) of the cells' centres."""
        cells = np.asarray(cells).reshape(-1, 2)
        return np.stack((self.origin[0] + (cells[:, 1] + 0.5) * self.cell,
                         self.origin[1] + (cells[:, 0] + 0.5) * self.cell), axis=1)

    def cell_of(self, xy: np.ndarray) -> np.ndarray:
        """(N, >=2) map positions (x, y, ...) -> (N, 2) integer (row, col); may lie outside the grid."""
        xy = np.asarray(xy, np.float64).reshape(-1, np.shape(xy)[-1] if np.ndim(xy) else 2)
        col = np.floor((xy[:, 0] - self.origin[0]) / self.cell).astype(np.int64)
        row = np.floor((xy[:, 1] - self.origin[1]) / self.cell).astype(np.int64)
        return np.stack((row, col), axis=1)

    def visits(self, positions: np.ndarray) -> np.ndarray:
        """Frames per cell (rows, cols) int64 of positions (N, >=2); positions off the grid are dropped."""
        rc = self.cell_of(positions)
        rows, cols = self.shape
        inside = (rc[:, 0] >= 0) & (rc[:, 0] < rows) & (rc[:, 1] >= 0) & (rc[:, 1] < cols)
        out = np.zeros(rows * cols, np.int64)
        np.add.at(out, rc[inside, 0] * cols + rc[inside, 1], 1)
        return out.reshape(rows, cols)

    def coverage(self, positions: np.ndarray | None = None, visits: np.ndarray | None = None) -> dict:
        """How much of the reachable area positions (N, >=2) visit, and how evenly:
        `visited` share of reachable cells with at least one frame; `evenness` the normalised entropy of
        the frames' distribution over reachable cells (1 = every cell equally often, 0 = one cell);
        `well_covered` share of reachable cells with at least a tenth of the mean frames per cell;
        `outside` share of frames in cells the geometry calls unreachable (lifts, teleporters)."""
        v = self.visits(positions) if visits is None else np.asarray(visits)
        total = int(v.sum())
        inside = v[self.reachable].astype(np.float64)
        n = self.reachable_cells
        if n == 0 or inside.sum() == 0:
            return {"cells": n, "cell_size": self.cell, "frames": total, "visited": 0.0, "evenness": 0.0,
                    "well_covered": 0.0, "outside": 1.0 if total else 0.0}
        p = inside[inside > 0] / inside.sum()
        entropy = float(-(p * np.log(p)).sum())
        return {"cells": n, "cell_size": self.cell, "frames": total,
                "visited": float((inside > 0).sum() / n),
                "evenness": entropy / float(np.log(n)) if n > 1 else 1.0,
                "well_covered": float((inside >= 0.1 * inside.sum() / n).sum() / n),
                "outside": float(1.0 - inside.sum() / total)}

    def starts(self, split: str) -> np.ndarray:
        """Start cells (N, 2) (row, col) of a split. "eval": EVAL_STARTS cells spread over the level by
        farthest-point sampling from the player start; "train": every other start cell that is not
        one of them or next to one (4-neighbourhood)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if self._starts is None:
            self._starts = _split_starts(self)
        return self._starts[split]

    def to_dict(self) -> dict:
        return {"wad": self.wad, "map": self.map, "cell": self.cell, "origin": list(self.origin),
                "shape": list(self.shape), "reachable_cells": self.reachable_cells,
                "start_cells": int(self.start_ok.sum()), "player_start": list(self.player_start)}


def farthest_points(level: Level, xy: np.ndarray, n: int) -> list[int]:
    """Indices of n of the points xy (N, 2) spread over them: the point nearest the player start first,
    then each time the one farthest from those chosen (farthest-point sampling, deterministic). Any
    first k of them are spread too."""
    xy = np.asarray(xy, np.float64)
    chosen = [int(np.argmin(np.linalg.norm(xy - np.asarray(level.player_start, np.float64), axis=1)))]
    d = np.linalg.norm(xy - xy[chosen[0]], axis=1)
    while len(chosen) < min(n, len(xy)):
        i = int(np.argmax(d))
        chosen.append(i)
        d = np.minimum(d, np.linalg.norm(xy - xy[i], axis=1))
    return chosen


def _split_starts(level: Level) -> dict[str, np.ndarray]:
    cand = np.argwhere(level.start_ok)  # (N, 2), row-major order: deterministic
    if len(cand) < 2 * EVAL_STARTS:
        raise UserError(f"{level.wad} {level.map}: only {len(cand)} start cells; a level model needs at least "
                        f"{2 * EVAL_STARTS}")
    ev = cand[sorted(farthest_points(level, level.centre(cand), EVAL_STARTS))]
    near = np.zeros(level.shape, bool)
    for dr, dc in ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)):
        r, c = ev[:, 0] + dr, ev[:, 1] + dc
        ok = (r >= 0) & (r < level.shape[0]) & (c >= 0) & (c < level.shape[1])
        near[r[ok], c[ok]] = True
    train = cand[~near[cand[:, 0], cand[:, 1]]]
    return {"eval": ev, "train": train}


# -- reading the geometry from the game ------------------------------------------------------------------
def _inside(px: np.ndarray, py: np.ndarray, segs: np.ndarray) -> np.ndarray:
    """Even-odd rule: points (N,) inside the region bounded by segments (M, 4) x1 y1 x2 y2. A sector's
    lines include those of the sectors inside it, so its holes come out right."""
    x1, y1, x2, y2 = (segs[:, i][None] for i in range(4))
    px, py = px[:, None], py[:, None]
    crosses = (y1 > py) != (y2 > py)
    with np.errstate(divide="ignore", invalid="ignore"):
        xi = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
    return ((crosses & (px < xi)).sum(axis=1) % 2) == 1


def _sector_index(px: np.ndarray, py: np.ndarray, sectors: list[dict]) -> np.ndarray:
    """Index of the sector each point lies in (-1: none). Where sectors nest, the smallest wins."""
    out = np.full(len(px), -1, np.int64)
    best = np.full(len(px), np.inf)
    for i, s in enumerate(sectors):
        inside = _inside(px, py, s["lines"])
        better = inside & (s["area"] < best)
        out[better], best[better] = i, s["area"]
    return out


def _reachable_sectors(sectors: list[dict], start: int) -> np.ndarray:
    """Flood fill over sectors from `start` through shared lines that do not block the player."""
    owners: dict[tuple, list[int]] = {}
    for i, s in enumerate(sectors):
        for (x1, y1, x2, y2), blocking in zip(s["lines"].tolist(), s["blocking"].tolist()):
            if not blocking:
                key = (min((x1, y1), (x2, y2)), max((x1, y1), (x2, y2)))
                owners.setdefault(key, []).append(i)
    neighbours: list[set[int]] = [set() for _ in sectors]
    for group in owners.values():
        for a in group:
            neighbours[a].update(b for b in group if b != a)

    seen = np.zeros(len(sectors), bool)
    seen[start] = True
    todo = [start]
    while todo:
        a = todo.pop()
        for b in neighbours[a]:
            if not seen[b]:
                seen[b] = True
                todo.append(b)
    return seen


def read_sectors(wad: str, map_name: str) -> tuple[list[dict], tuple[float, float]]:
    """Every sector of a map ({"floor", "ceiling", "lines" (M, 4), "blocking" (M,), "area"}) and the
    player start (x, y), from a short-lived headless ViZDoom."""
    import vizdoom as vzd

    from worldmodel.game.doom import private_tmpdir, use_wad

    g = vzd.DoomGame()
    tmp = private_tmpdir("worldmodel-level-")
    try:
        g.set_doom_config_path(os.path.join(tmp, "_vizdoom.ini"))
        use_wad(g, wad)
        g.set_doom_map(map_name)
        g.set_window_visible(False)
        g.set_sound_enabled(False)
        g.set_screen_resolution(vzd.ScreenResolution.RES_160X120)
        g.set_sectors_info_enabled(True)
        g.set_available_game_variables([vzd.GameVariable.POSITION_X, vzd.GameVariable.POSITION_Y])
        cwd = os.getcwd()
        os.chdir(tmp)  # ViZDoom makes a `_vizdoom` folder in the working directory
        try:
            g.init()
        except Exception as e:
            raise UserError(f"cannot start ViZDoom on {wad} {map_name}: {e}") from None
        finally:
            os.chdir(cwd)
        g.new_episode()
        state = g.get_state()
        start = (float(g.get_game_variable(vzd.GameVariable.POSITION_X)),
                 float(g.get_game_variable(vzd.GameVariable.POSITION_Y)))
        sectors = []
        for s in state.sectors:
            lines = np.array([(ln.x1, ln.y1, ln.x2, ln.y2) for ln in s.lines], np.float64).reshape(-1, 4)
            # the area of the lines' bounding box: enough to prefer a nested sector over its host
            area = float(np.ptp(lines[:, [0, 2]]) * np.ptp(lines[:, [1, 3]])) if len(lines) else np.inf
            sectors.append({"floor": float(s.floor_height), "ceiling": float(s.ceiling_height), "lines": lines,
                            "blocking": np.array([bool(ln.is_blocking) for ln in s.lines], bool), "area": area})
        return sectors, start
    finally:
        g.close()
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


@functools.lru_cache(maxsize=8)
def load_level(wad: str = "freedoom2", map_name: str = "MAP01", cell: int = CELL) -> Level:
    """The walkable grid of a map (a second or so: one headless engine start)."""
    sectors, start = read_sectors(wad, map_name.upper())
    if not sectors:
        raise UserError(f"{wad} {map_name}: the engine reports no sectors")
    allx = np.concatenate([s["lines"][:, [0, 2]].ravel() for s in sectors])
    ally = np.concatenate([s["lines"][:, [1, 3]].ravel() for s in sectors])
    x0, y0 = float(np.floor(allx.min() / cell) * cell), float(np.floor(ally.min() / cell) * cell)
    cols, rows = int(np.ceil((allx.max() - x0) / cell)), int(np.ceil((ally.max() - y0) / cell))
    start_sector = _sector_index(np.array([start[0]]), np.array([start[1]]), sectors)[0]
    if start_sector < 0:
        raise UserError(f"{wad} {map_name}: the player start lies in no sector")
    reach = _reachable_sectors(sectors, int(start_sector))
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    cx, cy = x0 + (cc.ravel() + 0.5) * cell, y0 + (rr.ravel() + 0.5) * cell

    def in_reach(px, py):
        idx = _sector_index(px, py, sectors)
        return np.where(idx >= 0, reach[np.maximum(idx, 0)], False), idx

    centre_ok, centre_sector = in_reach(cx, cy)
    floor = np.array([s["floor"] for s in sectors])
    room = np.array([s["ceiling"] - s["floor"] for s in sectors])
    start_ok = centre_ok & (room[np.maximum(centre_sector, 0)] >= PLAYER_HEIGHT)
    for dx, dy in ((START_MARGIN, 0), (-START_MARGIN, 0), (0, START_MARGIN), (0, -START_MARGIN)):
        ok, idx = in_reach(cx + dx, cy + dy)
        level = np.abs(floor[np.maximum(idx, 0)] - floor[np.maximum(centre_sector, 0)]) <= STEP
        start_ok &= ok & level
    return Level(wad=wad, map=map_name.upper(), cell=cell, origin=(x0, y0),
                 reachable=centre_ok.reshape(rows, cols), start_ok=start_ok.reshape(rows, cols),
                 player_start=start)


def coverage_map(level: Level, visits: np.ndarray) -> np.ndarray:
    """An RGB picture (rows, cols, 3) uint8 of visits per cell, north up: unreachable cells black,
    reachable never-visited cells red, visited cells grey to white by log(frames)."""
    v = np.asarray(visits, np.float64)
    img = np.zeros((*level.shape, 3), np.uint8)
    vis = level.reachable & (v > 0)
    img[level.reachable & (v == 0)] = (160, 30, 30)
    if vis.any():
        lv = np.log1p(v[vis])
        shade = 70 + 185 * (lv - lv.min()) / max(lv.max() - lv.min(), 1e-9)
        img[vis] = shade.astype(np.uint8)[:, None]
    return img[::-1]  # map y grows north; image rows grow down
