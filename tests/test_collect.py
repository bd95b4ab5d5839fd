"""`worldmodel collect`: the map split is enforced, and an interrupted collection resumes to exactly the
dataset an uninterrupted one makes."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from worldmodel import cli
from worldmodel.data import dataset as ds
from worldmodel.data import verify
from worldmodel.files import atomic_write_json
from worldmodel.data.collect import collect
from worldmodel.data.units import CollectConfig, plan
from worldmodel.errors import UserError

TINY = dict(frames=150, episode_frames=60, shard_frames=25, frame_size=[24, 32], warmup_frames=30,
            maps=["MAP01", "MAP02"], seed=3)


def shard_table(root):
    m = json.loads((root / "manifest.json").read_text())
    return [(s["name"], s["frames"], s["sha256"]) for s in m["shards"]]


@pytest.mark.parametrize("argv, what", [
    (["--maps", "MAP25"], "held-out"),
    (["--maps", "MAP01,MAP32"], "held-out"),
    (["--maps", "MAP21"], "validation"),  # validation maps are not training data
    (["--split", "val", "--maps", "MAP01"], "validation maps only"),
    (["--split", "val", "--maps", "MAP26"], "held-out"),
    (["--maps", "MAP99"], "MAP99"),
    (["--maps", "E1M1"], "E1M1"),
])
def test_refuses_maps_outside_the_split(tmp_path, capsys, argv, what):
    out = tmp_path / "d"
    assert cli.main(["collect", "--frames", "10", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert what in err and len(err.strip().splitlines()) == 1
    assert not (out / "manifest.json").exists()


def test_plan_is_deterministic():
    units = plan(CollectConfig(**TINY))
    assert [u.frames for u in units] == [60, 60, 30]
    assert [u.map for u in units] == ["MAP01", "MAP02", "MAP01"]
    assert [[c for _, _, c, _ in u.parts] for u in units] == [[25, 25, 10], [25, 25, 10], [25, 5]]
    assert [u.seed for u in units] == [u.seed for u in plan(CollectConfig(**TINY))]
    assert len({u.seed for u in units}) == 3
    assert [u.seed for u in plan(CollectConfig(**dict(TINY, seed=4)))] != [u.seed for u in units]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """an uninterrupted collection, in this process"""
    root = tmp_path_factory.mktemp("ref")
    collect(CollectConfig(**TINY), root, workers=0, progress=False)
    return root


def test_collection_is_valid(reference):
    s = verify.verify_dataset(reference)
    assert s["frames"] == 150 and s["shards"] == 8 and s["maps"] == {"MAP01": 90, "MAP02": 60}
    conf = json.loads((reference / "collect.json").read_text())
    assert conf["frames"] == 150 and conf["seed"] == 3 and conf["frame_size"] == [24, 32]
    assert conf["split"] == "train" and conf["policy"]
    arrays = ds.load_shard(reference, "shards/ep000001-0000.npz")
    assert arrays["frames"].shape == (25, 24, 32, 3)
    assert np.all(arrays["actions"][0] == 0) and arrays["frame_index"][0] == 0  # no-op first frame
    assert np.abs(arrays["actions"][1:]).sum() > 0  # the policy acts
    assert len(np.unique(arrays["frames"].reshape(25, -1), axis=0)) > 10  # frames change


def test_resume_repairs_missing_unlisted_and_temp_files(reference, tmp_path):
    root = tmp_path / "d"
    collect(CollectConfig(**TINY), root, workers=0, progress=False)
    assert shard_table(root) == shard_table(reference)  # deterministic, byte for byte
    m = json.loads((root / "manifest.json").read_text())
    (root / m["shards"][2]["name"]).unlink()  # a lost shard
    m["shards"] = m["shards"][:5] + m["shards"][6:]  # a shard renamed into place, manifest not yet written
    atomic_write_json(root / "manifest.json", m)
    stale = root / "shards" / ".ep000002-0001.npz.tmp-999-dead"
    stale.write_bytes(b"half written")
    collect(CollectConfig(**TINY), root, workers=0, progress=False)
    assert shard_table(root) == shard_table(reference)
    assert not stale.exists()
    verify.verify_dataset(root)


def test_refuses_to_mix_settings(reference):
    for change in (dict(seed=4), dict(frame_size=[48, 64]), dict(episode_frames=50), dict(maps=["MAP03"]),
                   dict(straight_back=0.5)):
        with pytest.raises(UserError, match="other settings"):
            collect(CollectConfig(**dict(TINY, **change)), reference, workers=0, progress=False)
    with pytest.raises(UserError, match="more than --frames"):
        collect(CollectConfig(**dict(TINY, frames=100)), reference, workers=0, progress=False)
    assert collect(CollectConfig(**TINY), reference, workers=0, progress=False)["new_frames"] == 0


def test_growing_a_dataset_equals_collecting_it_at_once(reference, tmp_path):
    grown, fresh = tmp_path / "grown", tmp_path / "fresh"
    collect(CollectConfig(**TINY), grown, workers=0, progress=False)
    collect(CollectConfig(**dict(TINY, frames=170)), grown, workers=0, progress=False)
    collect(CollectConfig(**dict(TINY, frames=170)), fresh, workers=0, progress=False)
    assert shard_table(grown) == shard_table(fresh)
    verify.verify_dataset(grown)


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan"])
def test_refuses_a_straight_back_share_outside_0_1(tmp_path, capsys, value):
    out = tmp_path / "d"
    assert cli.main(["collect", "--frames", "10", "--out", str(out), "--maps", "MAP01", "--straight-back", value]) == 2
    err = capsys.readouterr().err
    assert "--straight-back" in err and len(err.strip().splitlines()) == 1


def test_straight_back_is_recorded_and_changes_what_is_played(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    collect(CollectConfig(**dict(TINY, frames=60, maps=["MAP01"])), a, workers=0, progress=False)
    collect(CollectConfig(**dict(TINY, frames=60, maps=["MAP01"], straight_back=1.0)), b, workers=0, progress=False)
    assert json.loads((b / "collect.json").read_text())["straight_back"] == 1.0
    acts = [np.concatenate([ds.load_shard(r, s["name"])["actions"] for s in ds.load_manifest(r)["shards"]])
            for r in (a, b)]
    assert not np.array_equal(*acts)


def test_a_dataset_from_before_a_setting_resumes_with_its_default(tmp_path):
    root = tmp_path / "old"
    collect(CollectConfig(**dict(TINY, frames=60, maps=["MAP01"])), root, workers=0, progress=False)
    conf = json.loads((root / "collect.json").read_text())
    for key in ("starts", "straight_back"):  # collect.json as written before these settings existed
        del conf[key]
    atomic_write_json(root / "collect.json", conf)
    assert collect(CollectConfig(**dict(TINY, frames=60, maps=["MAP01"])), root, workers=0, progress=False)["new_frames"] == 0
    with pytest.raises(UserError, match="straight_back"):
        collect(CollectConfig(**dict(TINY, frames=60, maps=["MAP01"], straight_back=0.5)), root, workers=0,
                progress=False)


def test_validation_split(tmp_path):
    root = tmp_path / "val"
    collect(CollectConfig(**dict(TINY, frames=30, maps=["MAP22"], split="val")), root, workers=0, progress=False)
    assert verify.verify_dataset(root)["maps"] == {"MAP22": 30}


def test_killed_collection_completes_exactly(reference, tmp_path):
    cfg = dict(TINY, frames=600, episode_frames=200, shard_frames=50)
    uninterrupted = tmp_path / "uninterrupted"
    collect(CollectConfig(**cfg), uninterrupted, workers=0, progress=False)
    root = tmp_path / "killed"
    argv = [sys.executable, "-m", "worldmodel", "collect", "--frames", "600", "--out", str(root),
            "--maps", "MAP01,MAP02", "--seed", "3", "--frame-size", "24x32", "--episode-frames", "200",
            "--shard-frames", "50", "--warmup-frames", "30", "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            shards = root / "shards"
            if shards.is_dir() and any(p.suffix == ".npz" for p in shards.iterdir()):
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # kill -9 the whole process group, workers included
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = list((root / "shards").glob("*.npz"))
    assert 0 < len(done) < 12, "the collection was not interrupted in the middle"
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300)  # the same command again
    assert r.returncode == 0, r.stderr[-2000:]
    assert shard_table(root) == shard_table(uninterrupted)  # nothing missing, nothing twice, same bytes
    s = verify.verify_dataset(root)
    assert s["frames"] == 600 and s["episodes"] == 3


def test_a_game_that_cannot_start_in_the_workers_is_one_clear_error(tmp_path):
    # a broken ViZDoom install: importing it fails inside every worker. With 16 workers, CPython's
    # Pool.terminate used to hang here now and then (a worker respawned while terminating), and the
    # stopped workers printed tracebacks
    fake = tmp_path / "site" / "vizdoom"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise FileNotFoundError(2, 'No such file or directory', '/gone/scenarios')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "site"),
                                                                     os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, "-m", "worldmodel", "collect", "--frames", "3200", "--out", str(tmp_path / "d"),
            "--maps", "MAP01,MAP02", "--frame-size", "24x32", "--episode-frames", "100", "--workers", "16",
            "--no-progress"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)  # a hang fails here
    assert r.returncode == 2
    # one line: no tracebacks from the workers the pool stops
    assert r.stderr.strip().splitlines() == ["worldmodel collect: error: [Errno 2] No such file or directory: "
                                             "'/gone/scenarios'"], r.stderr[-2000:]


def test_level_exit_starts_a_new_episode(tmp_path, monkeypatch):
    """if the player leaves the level, the rest of the unit is a new episode (k + segment * stride)"""
    from worldmodel.game import doom as game
    from worldmodel.data.units import SEGMENT_STRIDE

    real_step = game.DoomEnv.step
    calls = {"n": 0}

    def step(self, action):
        calls["n"] += 1
        if calls["n"] == 40:  # no warm-up: step call i makes frame i; frame 40 is after an exit
            real_step(self, action)
            self.restarted = True
            return self._new_episode().copy()
        return real_step(self, action)

    monkeypatch.setattr(game.DoomEnv, "step", step)
    root = tmp_path / "exit"
    collect(CollectConfig(**dict(TINY, frames=60, warmup_frames=0)), root, workers=0, progress=False)
    s = verify.verify_dataset(root)
    assert s["frames"] == 60 and s["episodes"] == 2
    full = {k: np.concatenate([ds.load_shard(root, f"shards/ep000000-000{p}.npz")[k] for p in range(3)])
            for k in ("frames", "actions", "episode", "frame_index")}
    assert full["episode"].tolist() == [0] * 40 + [SEGMENT_STRIDE] * 20
    assert full["frame_index"].tolist() == list(range(40)) + list(range(20))
    assert np.all(full["actions"][40] == 0)  # the restart frame counts as produced by the no-op
    clips = ds.ClipDataset(root, 8, stride=1)
    assert len(clips) == (40 - 8 + 1) + (20 - 8 + 1)
    for i in range(len(clips)):  # no clip runs across the cut
        c = clips[i]
        rows = np.flatnonzero(full["episode"] == c["episode"])[c["frame_index"]:c["frame_index"] + 8]
        assert len(rows) == 8 and np.array_equal(c["frames"].numpy(), full["frames"][rows])
