"""Level geometry, coverage and the start places of a level model (worldmodel/game/level.py), the warp into
them (DoomEnv.warp) and `collect --starts level`: training and evaluation episodes apart by construction."""
import numpy as np
import pytest

from worldmodel.data import collect as C
from worldmodel.data.units import CollectConfig, plan
from worldmodel.data import dataset as ds
from worldmodel.data import verify
from worldmodel.game.level import EVAL_STARTS, Level, episode_seed, load_level


def grid_level(reachable: np.ndarray, cell: int = 64) -> Level:
    reachable = np.asarray(reachable, bool)
    return Level(wad="freedoom2", map="MAP01", cell=cell, origin=(0.0, 0.0), reachable=reachable,
                 start_ok=np.zeros_like(reachable), player_start=(32.0, 32.0))


def test_coverage_of_a_known_path():
    # a 4x5 grid, 12 reachable cells (rows 0-2, cols 0-3); a path through 6 of them, two frames each,
    # and 3 frames in an unreachable cell
    reach = np.zeros((4, 5), bool)
    reach[:3, :4] = True
    lv = grid_level(reach)
    path = [(0, 0), (0, 1), (0, 2), (1, 2), (2, 2), (2, 3)]
    pos = [(c * 64 + 10.0, r * 64 + 50.0, 0.0) for r, c in path for _ in range(2)]
    pos += [(4 * 64 + 1.0, 3 * 64 + 1.0, 90.0)] * 3 + [(-500.0, 0.0, 0.0)]  # unreachable, off the grid
    cov = lv.coverage(np.array(pos))
    assert cov["cells"] == 12 and cov["frames"] == 15  # on the grid
    assert cov["visited"] == pytest.approx(6 / 12)
    assert cov["well_covered"] == pytest.approx(6 / 12)
    assert cov["outside"] == pytest.approx(3 / 15)  # the frame off the grid is not counted anywhere
    assert cov["evenness"] == pytest.approx(np.log(6) / np.log(12))  # 6 cells equally often
    full = np.array([(c * 64 + 32.0, r * 64 + 32.0) for r in range(3) for c in range(4)])
    assert lv.coverage(full)["visited"] == 1.0 and lv.coverage(full)["evenness"] == pytest.approx(1.0)
    assert lv.visits(full).sum() == 12 and lv.visits(full)[3].sum() == 0


def test_episode_seeds_of_the_two_splits_never_meet():
    train = {episode_seed("train", v) for v in range(0, 2 ** 40, 2 ** 27 + 12345)}
    ev = {episode_seed("eval", v) for v in range(0, 2 ** 40, 2 ** 27 + 12345)}
    assert not train & ev and all(s % 2 == 0 for s in train) and all(s % 2 == 1 for s in ev)
    assert max(train | ev) < 2 ** 32
    with pytest.raises(ValueError):
        episode_seed("val", 1)


@pytest.fixture(scope="module")
def map01() -> Level:
    return load_level("freedoom2", "MAP01")


def test_map01_start_places_are_spread_and_apart(map01):
    lv = map01
    assert lv.reachable_cells > 400  # MAP01 is about 650 cells of 64x64 units
    ev, tr = lv.starts("eval"), lv.starts("train")
    assert len(ev) == EVAL_STARTS and len(tr) > 300
    assert lv.start_ok[ev[:, 0], ev[:, 1]].all() and lv.start_ok[tr[:, 0], tr[:, 1]].all()
    # no training start is an evaluation start or next to one
    d = np.abs(tr[:, None, :] - ev[None, :, :]).sum(-1)  # (train, eval) Manhattan distance in cells
    assert d.min() >= 2
    # spread over the whole level: every reachable cell is within a few cells of an evaluation start
    reach = np.argwhere(lv.reachable)
    nearest = np.abs(reach[:, None, :] - ev[None]).max(-1).min(1)
    assert nearest.max() <= 12
    assert np.array_equal(load_level("freedoom2", "MAP01").starts("eval"), ev)  # fixed


def test_warp_puts_the_player_at_a_start_place_facing_the_heading(map01):
    from worldmodel.game.doom import DoomEnv

    x, y = map01.centre(map01.starts("eval")[:1])[0]
    with DoomEnv(map="MAP01", frame_size=(48, 64)) as env:
        first = env.reset()
        frame = env.warp(x, y, 135.0)
        px, py, angle = env.position
        assert (px, py) == pytest.approx((x, y), abs=1.0) and angle == pytest.approx(135.0, abs=0.5)
        assert frame.shape == (48, 64, 3) and not np.array_equal(frame, first)


def test_level_collection_keeps_evaluation_episodes_out_of_training(map01, tmp_path):
    cfg = CollectConfig(frames=64 * 50, maps=["MAP01"], starts="level", episode_frames=64, shard_frames=64,
                        warmup_frames=0)
    units = plan(cfg)
    ev_cells = {tuple(c) for c in map01.starts("eval")}
    train_cells = {tuple(c) for c in map01.starts("train")}
    for u in units:
        cell = tuple(map01.cell_of(np.array([u.start[:2]]))[0])
        assert cell in train_cells and cell not in ev_cells and u.seed % 2 == 0
    val = plan(CollectConfig(frames=64 * EVAL_STARTS, maps=["MAP01"], starts="level", split="val",
                             episode_frames=64, shard_frames=64, warmup_frames=0))
    assert {tuple(map01.cell_of(np.array([u.start[:2]]))[0]) for u in val} == ev_cells
    assert all(u.seed % 2 == 1 for u in val) and not {u.seed for u in val} & {u.seed for u in units}
    # a real collection: every episode starts where the plan says, in a training start cell
    out = tmp_path / "lvl"
    C.collect(CollectConfig(frames=2 * 16, maps=["MAP01"], starts="level", episode_frames=16, shard_frames=16,
                            warmup_frames=0), out, workers=0, progress=False)
    firsts = [s["position"][0] for s in ds.iter_shards(out)]
    assert len(firsts) == 2
    for p in firsts:
        assert tuple(map01.cell_of(p[None])[0]) in train_cells
    # a level's datasets serve their own split only: training episodes never as validation, and back
    from worldmodel.training.clips import read_frames
    from worldmodel.errors import UserError

    val_out = tmp_path / "lvl-val"
    C.collect(CollectConfig(frames=16, maps=["MAP01"], starts="level", split="val", episode_frames=16,
                            shard_frames=16, warmup_frames=0), val_out, workers=0, progress=False)
    assert len(read_frames(out, "train", progress=False)[0]) == 32
    assert len(read_frames(val_out, "val", progress=False)[0]) == 16
    with pytest.raises(UserError, match="training episodes"):
        read_frames(out, "val", progress=False)
    with pytest.raises(UserError, match="held-out episodes"):
        read_frames(val_out, "train", progress=False)
    # `data verify` reports the coverage of the level from the shards' positions
    cov = verify.verify_dataset(out)["coverage"]["MAP01"]
    positions = np.concatenate([s["position"] for s in ds.iter_shards(out)])
    want = map01.coverage(positions)
    assert {k: cov[k] for k in want} == want and 0 < cov["visited"] < 0.05


def test_level_collection_refuses_several_maps():
    from worldmodel.errors import UserError

    with pytest.raises(UserError, match="one map"):
        CollectConfig(frames=10, maps=["MAP01", "MAP02"], starts="level")
    with pytest.raises(UserError, match="held-out|validation|training"):
        CollectConfig(frames=10, maps=["MAP21"], starts="level")


def _user_wad(path, source_map="MAP01", name="MAP33"):
    """A user's PWAD: freedoom2's `source_map` lumps under a map name freedoom2 does not have."""
    import struct

    from worldmodel.game.doom import wad_path

    data = open(wad_path("freedoom2"), "rb").read()
    n, table = struct.unpack_from("<ii", data, 4)
    lumps = [struct.unpack_from("<ii8s", data, table + 16 * i) for i in range(n)]
    names = [nm.rstrip(b"\0").decode() for _, _, nm in lumps]
    i = names.index(source_map)
    body, entries = b"", []
    for pos, size, nm in lumps[i:i + 11]:  # the marker + THINGS ... BLOCKMAP
        label = name.encode() if nm.rstrip(b"\0").decode() == source_map else nm
        entries.append((12 + len(body), size, label.ljust(8, b"\0")))
        body += data[pos:pos + size]
    table = b"".join(struct.pack("<ii8s", *e) for e in entries)
    path.write_bytes(b"PWAD" + struct.pack("<ii", len(entries), 12 + len(body)) + body + table)
    return str(path)


def test_a_users_own_wad_is_a_level_to_collect(map01, tmp_path):
    """`--wad my.wad`: a user's map (here MAP01's geometry under the name MAP33, which freedoom2 lacks) is
    loaded on top of freedoom2, is outside the Freedoom split, and can be a level model's level."""
    from worldmodel.game.doom import DoomEnv
    from worldmodel.game.maps import parse_wad, split_of

    wad = parse_wad(_user_wad(tmp_path / "mine.wad"))
    assert split_of(wad, "MAP33") == "user"
    lv = load_level(wad, "MAP33")
    assert lv.reachable_cells == map01.reachable_cells and lv.player_start == map01.player_start
    with DoomEnv(wad=wad, map="MAP33", frame_size=(48, 64)) as env, DoomEnv(map="MAP01", frame_size=(48, 64)) as ref:
        assert np.array_equal(env.reset(), ref.reset())
    out = tmp_path / "mine"
    C.collect(CollectConfig(frames=16, maps=["MAP33"], wad=wad, starts="level", episode_frames=16,
                            shard_frames=16, warmup_frames=0), out, workers=0, progress=False)
    assert verify.verify_dataset(out)["coverage"]["MAP33"]["visited"] > 0
