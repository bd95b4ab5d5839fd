"""Dataset shards, manifest, verification and the training loaders (synthetic data, no Doom)."""
import json
import os

import numpy as np
import pytest

from worldmodel import cli
from worldmodel.data import dataset as ds
from worldmodel.data import tools, verify, writer
from worldmodel.files import is_temp_file
from worldmodel.game.action import NOOP, Action

H, W = 6, 8


def episode_arrays(ep, n, map_name, start=0):
    """frames encode (episode, frame index) so that clips can be checked pixel by pixel"""
    fi = np.arange(start, start + n, dtype=np.int32)
    frames = np.zeros((n, H, W, 3), np.uint8)
    frames[..., 0] = (fi % 256)[:, None, None]
    frames[..., 1] = (fi // 256)[:, None, None]
    frames[..., 2] = ep
    rng = np.random.default_rng(ep)
    acts = np.stack([Action(move=int(rng.integers(-1, 2)), turn=float(rng.uniform(-15, 15))).to_vector()
                     for _ in range(start + n)]).astype(np.float32)[start:]
    acts[fi == 0] = NOOP.to_vector()
    return {"frames": frames, "actions": acts, "episode": np.full(n, ep, np.int64), "frame_index": fi,
            "map": np.full(n, map_name, ds.MAP_DTYPE), "position": np.zeros((n, 3), np.float32)}


def concat(parts):
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def make_dataset(root, episodes=((0, 50, "MAP01"), (1, 37, "MAP02"), (2, 64, "MAP03")), shard=16):
    """each episode written as shards of `shard` frames, like collect does"""
    manifest = writer.new_manifest((H, W))
    for ep, n, m in episodes:
        for p, a in enumerate(range(0, n, shard)):
            arrays = episode_arrays(ep, min(shard, n - a), m, start=a)
            manifest["shards"].append(writer.write_shard(root, f"shards/ep{ep:06d}-{p:04d}.npz", arrays))
    return writer.write_manifest(root, manifest)


def test_write_and_verify(tmp_path):
    m = make_dataset(tmp_path)
    assert m["frames"] == 151 and m["episodes"] == 3 and len(m["shards"]) == 4 + 3 + 4
    s = verify.verify_dataset(tmp_path)
    assert s["frames"] == 151 and s["episodes"] == 3 and s["maps"] == {"MAP01": 50, "MAP02": 37, "MAP03": 64}
    # no pickle: plain np.load with allow_pickle=False reads a shard
    with np.load(tmp_path / m["shards"][0]["name"], allow_pickle=False) as z:
        assert set(z.files) == {"frames", "actions", "episode", "frame_index", "map", "position"}
        assert z["frames"].dtype == np.uint8 and z["actions"].dtype == np.float32
    # the same arrays give the same bytes (deterministic shards)
    a = episode_arrays(0, 10, "MAP01")
    assert writer.encode_shard(a) == writer.encode_shard(a)


def test_verify_reports_the_action_mix(tmp_path):
    make_dataset(tmp_path)
    acts = concat([episode_arrays(ep, n, m) for ep, n, m in ((0, 50, "MAP01"), (1, 37, "MAP02"), (2, 64, "MAP03"))])["actions"]
    mix = verify.verify_dataset(tmp_path)["action_mix"]
    move = acts[:, 0]
    assert mix["forward"] == pytest.approx((move == 1).mean()) and mix["backward"] == pytest.approx((move == -1).mean())
    assert mix["forward"] + mix["still"] + mix["backward"] == pytest.approx(1.0)
    assert 0 < mix["backward"] < 1 and mix["turn"] == pytest.approx((acts[:, 2] != 0).mean()) and mix["use"] == 0
    # backing off straight: backward with no strafe and no turn (attack and use do not matter)
    acts = np.stack([a.to_vector() for a in (Action(move=-1), Action(move=-1, attack=True), Action(move=-1, turn=2.0),
                                             Action(move=-1, strafe=1), Action(move=1), NOOP)])
    counts = verify.action_counts(acts)
    assert counts["straight back"] == 2 and counts["backward"] == 4 and counts["still"] == 1


def test_object_arrays_are_refused(tmp_path):
    a = episode_arrays(0, 4, "MAP01")
    a["map"] = np.array(["MAP01"] * 4, dtype=object)
    with pytest.raises(ds.DatasetError):
        writer.write_shard(tmp_path, "shards/x.npz", a)


@pytest.mark.parametrize("damage", ["truncate", "edit", "delete", "garbage_same_size"])
def test_verify_names_the_corrupt_shard(tmp_path, damage):
    m = make_dataset(tmp_path)
    name = m["shards"][5]["name"]
    path = tmp_path / name
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "edit":
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "delete":
        path.unlink()
    else:
        path.write_bytes(b"\0" * len(data))
    with pytest.raises(ds.DatasetError, match=name):
        verify.verify_dataset(tmp_path)


def test_verify_catches_inconsistent_content(tmp_path):
    m = make_dataset(tmp_path)
    # a valid shard whose content disagrees with the manifest (rewritten, manifest entry patched to match)
    victim = m["shards"][1]
    arrays = ds.load_shard(tmp_path, victim["name"])
    arrays["frame_index"] = arrays["frame_index"] + 1  # a gap / overlap with its neighbour
    entry = writer.write_shard(tmp_path, victim["name"], arrays)
    m["shards"][1] = entry
    writer.write_manifest(tmp_path, m)
    with pytest.raises(ds.DatasetError, match="episode 0"):
        verify.verify_dataset(tmp_path)


def test_verify_without_checksum_still_catches_truncation(tmp_path):
    m = make_dataset(tmp_path)
    name = m["shards"][-1]["name"]
    (tmp_path / name).write_bytes((tmp_path / name).read_bytes()[:-10])
    with pytest.raises(ds.DatasetError, match=name):
        verify.verify_dataset(tmp_path, checksums=False)


def test_cli_verify(tmp_path, capsys):
    m = make_dataset(tmp_path)
    assert cli.main(["data", "verify", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "151 frames" in out and "3 episodes" in out and "MAP02 37" in out
    name = m["shards"][2]["name"]
    p = tmp_path / name
    p.write_bytes(p.read_bytes()[:100])
    assert cli.main(["data", "verify", str(tmp_path)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and name in err[0]
    assert cli.main(["data", "verify", str(tmp_path / "nope")]) != 0


def test_cli_verify_subprocess_exit_code(tmp_path):
    import subprocess
    import sys

    m = make_dataset(tmp_path)
    name = m["shards"][0]["name"]
    (tmp_path / name).write_bytes(b"junk")
    r = subprocess.run([sys.executable, "-m", "worldmodel", "data", "verify", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode != 0 and name in r.stderr and "Traceback" not in r.stderr


def test_temp_files_are_ignored_and_atomic_write_leaves_no_partial(tmp_path, monkeypatch):
    m = make_dataset(tmp_path)
    (tmp_path / "shards" / ".ep000000-0009.npz.tmp-123-abcd").write_bytes(b"half a shard")
    (tmp_path / ".manifest.json.tmp-123-abcd").write_text("{")
    assert verify.verify_dataset(tmp_path)["unlisted"] == []
    assert len(ds.ClipDataset(tmp_path, 8)) > 0
    assert writer.remove_temp_files(tmp_path) == 2
    # a writer that dies before the rename leaves the old file and no temporary file
    before = (tmp_path / ds.MANIFEST).read_bytes()

    def boom(*a, **k):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        writer.write_manifest(tmp_path, dict(m, shards=m["shards"][:1]))
    monkeypatch.undo()
    assert (tmp_path / ds.MANIFEST).read_bytes() == before
    assert [p for p in tmp_path.iterdir() if is_temp_file(p.name)] == []


def check_clip(item, clip_len):
    f = item["frames"].numpy()
    assert f.shape == (clip_len, H, W, 3) and f.dtype == np.uint8
    fi = f[:, 0, 0, 0].astype(int) + 256 * f[:, 0, 0, 1].astype(int)
    ep = f[:, 0, 0, 2]
    assert np.all(ep == item["episode"]), "a clip spans two episodes"
    assert np.array_equal(fi, np.arange(item["frame_index"], item["frame_index"] + clip_len))
    expect = episode_arrays(item["episode"], 200, "x")["actions"][item["frame_index"]:item["frame_index"] + clip_len]
    assert np.array_equal(item["actions"].numpy(), expect)
    return fi


def test_clips_stay_in_episodes_and_cross_shards(tmp_path):
    make_dataset(tmp_path, shard=16)
    clip_len = 12
    d = ds.ClipDataset(tmp_path, clip_len, stride=5, cache_shards=2)
    # every window of every episode: episode lengths 50, 37, 64
    assert len(d) == sum((n - clip_len) // 5 + 1 for n in (50, 37, 64))
    crossed = 0
    for i in range(len(d)):
        fi = check_clip(d[i], clip_len)
        crossed += (fi[0] // 16) != (fi[-1] // 16)  # first and last frame in different shards
    assert crossed > 5
    assert len(d.cache._cache) <= 2  # the LRU cache stays small
    assert d.frames == 151


def test_clips_in_shards_holding_several_episodes(tmp_path):
    # a shard layout that is a plain stream: episodes end and begin inside shards
    stream = concat([episode_arrays(0, 30, "MAP01"), episode_arrays(1, 25, "MAP21"), episode_arrays(2, 30, "MAP02")])
    manifest = writer.new_manifest((H, W))
    for j, a in enumerate(range(0, 85, 20)):
        manifest["shards"].append(writer.write_shard(tmp_path, f"shards/s{j:03d}.npz",
                                                 {k: v[a:a + 20] for k, v in stream.items()}))
    writer.write_manifest(tmp_path, manifest)
    assert verify.verify_dataset(tmp_path)["episodes"] == 3
    d = ds.ClipDataset(tmp_path, 10, stride=1)
    assert len(d) == 21 + 16 + 21
    for i in range(len(d)):
        check_clip(d[i], 10)
    val = ds.ClipDataset(tmp_path, 10, stride=1, maps=["MAP21"])
    assert len(val) == 16 and {val[i]["map"] for i in range(len(val))} == {"MAP21"}
    train = ds.ClipDataset(tmp_path, 10, stride=1, maps=["MAP01", "MAP02"])
    assert len(train) == 42 and {train[i]["episode"] for i in range(len(train))} == {0, 2}


def test_map_filter(tmp_path):
    make_dataset(tmp_path)
    d = ds.ClipDataset(tmp_path, 8, maps=["MAP02"])
    assert len(d) == 37 // 8 and all(d[i]["map"] == "MAP02" for i in range(len(d)))
    assert len(ds.ClipDataset(tmp_path, 8, maps=["MAP21"])) == 0


@pytest.mark.parametrize("window", [4, None])
def test_deterministic_resumable_order(tmp_path, window):
    make_dataset(tmp_path)
    a = ds.ClipDataset(tmp_path, 4, stride=2, seed=1, shuffle_shards=window)
    b = ds.ClipDataset(tmp_path, 4, stride=2, seed=1, shuffle_shards=window)
    c = ds.ClipDataset(tmp_path, 4, stride=2, seed=2, shuffle_shards=window)
    n = len(a)
    for epoch in range(3):
        assert sorted(a.order(epoch).tolist()) == list(range(n))  # a permutation
    assert not np.array_equal(a.order(0), a.order(1))
    assert np.array_equal(a.order(0), b.order(0)) and not np.array_equal(a.order(0), c.order(0))
    steps = [a.indices(s, 7) for s in range(30)]  # crosses epoch boundaries
    assert steps == [b.indices(s, 7) for s in range(30)]
    # a resumed run (start_step=12) sees exactly the batches the uninterrupted run saw
    it = iter(b.sampler(7, start_step=12))
    assert [next(it) for _ in range(7 * 5)] == sum(steps[12:17], [])
    batch = a.batch(3, 7)
    assert batch["frames"].shape == (7, 4, H, W, 3) and batch["actions"].shape == (7, 4, 5)


def test_dataloader(tmp_path):
    import torch

    make_dataset(tmp_path)
    d = ds.ClipDataset(tmp_path, 8)
    loader = torch.utils.data.DataLoader(d, batch_size=3, sampler=d.sampler(3))
    batch = next(iter(loader))
    assert batch["frames"].shape == (3, 8, H, W, 3) and batch["frames"].dtype == torch.uint8
    assert batch["actions"].dtype == torch.float32
    import pickle

    assert len(pickle.loads(pickle.dumps(d)).cache._cache) == 0  # workers start with an empty cache


def test_iter_frames(tmp_path):
    make_dataset(tmp_path)
    batches = list(ds.iter_frames(tmp_path, batch_size=40))
    assert [len(b) for b in batches] == [40, 40, 40, 31]
    frames, info = next(ds.iter_frames(tmp_path, batch_size=200, with_info=True))
    assert frames.shape == (151, H, W, 3) and len(info["episode"]) == 151
    only = list(ds.iter_frames(tmp_path, batch_size=1000, maps=["MAP03"]))
    assert len(only) == 1 and len(only[0]) == 64


def test_preview_grid(tmp_path):
    make_dataset(tmp_path)
    g = tools.preview_grid(tmp_path, n=16, cols=4)
    assert g.shape == (4 * H, 4 * W, 3)
    out = tmp_path / "g.png"
    assert cli.main(["data", "preview", str(tmp_path), "--out", str(out), "-n", "8"]) == 0 and out.exists()


def test_manifest_is_json_with_checksums(tmp_path):
    make_dataset(tmp_path)
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["format"] == "worldmodel-dataset" and m["version"] == 1 and m["fps"] == 35
    assert m["frame_size"] == [H, W] and m["action_fields"] == ["move", "strafe", "turn", "attack", "use"]
    assert all(len(s["sha256"]) == 64 for s in m["shards"])
    assert [s["name"] for s in m["shards"]] == sorted(s["name"] for s in m["shards"])


def test_start_clips_export_loads_as_checkpoint_start_scenes(tmp_path):
    from worldmodel.inference.engine import load_start_clips

    make_dataset(tmp_path / "d")
    paths = tools.export_start_clips(tmp_path / "d", tmp_path / "ckpt" / "start_clips", count=3, frames=8, skip=5)
    assert len(paths) == 3
    clips = load_start_clips(tmp_path / "ckpt", (H, W))
    episodes = [int(frames[0, 0, 0, 2]) for frames, _ in clips]  # channel 2 encodes the episode id
    assert sorted(episodes) == [0, 1, 2]
    for frames, actions in clips:
        ep = int(frames[0, 0, 0, 2])
        assert frames.shape == (8, H, W, 3) and len(actions) == 8
        assert actions == [Action.from_vector(v) for v in episode_arrays(ep, 13, "MAP01")["actions"][5:13]]
    with pytest.raises(ds.DatasetError, match="only 3 episodes"):
        tools.export_start_clips(tmp_path / "d", tmp_path / "x", count=4, frames=8, skip=5)


def test_start_clips_are_spread_over_the_places_the_data_went(tmp_path):
    """With player positions in the shards, start clips are far apart: the clip nearest the middle of
    the data first, then each time the one farthest from those chosen."""
    from worldmodel.inference.engine import load_start_clips

    manifest = writer.new_manifest((H, W))
    for ep, x in enumerate((0.0, 10.0, 20.0, 1000.0, 2000.0, 3000.0)):
        arrays = episode_arrays(ep, 16, "MAP01")
        arrays["position"][:, 0] = x
        manifest["shards"].append(writer.write_shard(tmp_path / "d", f"shards/ep{ep:06d}-0000.npz", arrays))
    writer.write_manifest(tmp_path / "d", manifest)
    tools.export_start_clips(tmp_path / "d", tmp_path / "ckpt" / "start_clips", count=3, frames=4, skip=2)
    episodes = [int(frames[0, 0, 0, 2]) for frames, _ in load_start_clips(tmp_path / "ckpt", (H, W))]
    assert episodes == [2, 5, 4]  # x = 20 (nearest the median 510), then 3000, then 2000
