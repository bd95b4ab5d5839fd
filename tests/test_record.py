"""`worldmodel record`: rollouts written in the recording format, deterministic, crash-safe; bad input."""
import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from worldmodel.inference import loading as cli_common
from worldmodel.game.action import Action, load_actions, save_actions
from worldmodel.cli import main
from helpers import engines_of
from worldmodel.data.recording import load_recording, paths, read_video





SCRIPT = [Action(move=1)] * 6 + [Action(turn=4.0)] * 3 + [Action(strafe=-1, attack=True)] * 2 + [Action()] * 3


def test_record_script_round_trips_and_is_deterministic(tmp_path, ckpt):
    save_actions(tmp_path / "walk.jsonl", SCRIPT)
    for name in ("a", "b"):
        assert main(["record", "--checkpoint", ckpt, "--device", "cpu", "--actions", str(tmp_path / "walk.jsonl"),
                     "--out", str(tmp_path / name), "--seed", "5", "--no-progress"]) == 0
    frames, acts, meta = load_recording(tmp_path / "a")
    assert acts == SCRIPT and frames.shape == (len(SCRIPT), 96, 128, 3)
    assert len(read_video(paths(tmp_path / "a")["video"])) == len(load_actions(paths(tmp_path / "a")["actions"]))
    assert meta["complete"] and meta["frames"] == len(SCRIPT) and meta["seed"] == 5 and meta["steps"] == 2
    assert meta["start_scene"]["source"] == "game" and meta["start_scene"]["map"] == "MAP01"
    assert meta["checkpoint_sha256"] and meta["device"] == "cpu"
    timings = paths(tmp_path / "a")["timings"].read_text().splitlines()
    assert len(timings) == len(SCRIPT) + 1
    frames_b, acts_b, _ = load_recording(tmp_path / "b")
    assert acts_b == acts and np.array_equal(frames_b, frames)  # same seed, same rollout
    # the recording's own actions file replays it
    assert main(["record", "--checkpoint", ckpt, "--device", "cpu", "--actions", str(paths(tmp_path / "a")["actions"]),
                 "--out", str(tmp_path / "replay"), "--seed", "5", "--no-progress"]) == 0
    frames_r, acts_r, _ = load_recording(tmp_path / "replay")
    assert acts_r == SCRIPT and np.array_equal(frames_r, frames)


def test_record_policy_side_by_side_many_seeds(tmp_path, ckpt):
    out = tmp_path / "runs"
    assert main(["record", "--checkpoint", ckpt, "--device", "cpu", "--policy", "explorer", "--frames", "6",
                 "--seed", "0,1", "--side-by-side", "--strip", "3", "--out", f"{out}/", "--no-progress"]) == 0
    for seed in (0, 1):
        frames, acts, meta = load_recording(out / f"explorer_seed{seed}")
        assert frames.shape == (6, 96, 256, 3) and len(acts) == 6
        assert meta["layout"] == "model | real game" and meta["actions_source"] == f"policy explorer seed {seed}"
        # the right half is the real game: never the flat grey of an untrained model
        assert frames[:, :, 128:].std() > 10
        # the strip: frames 0, 2 and 5 (evenly spaced), the model's row above the real game's
        strip = cv2.cvtColor(cv2.imread(str(out / f"explorer_seed{seed}.png")), cv2.COLOR_BGR2RGB)
        assert strip.shape == (192, 384, 3)
        for col, i in enumerate((0, 2, 5)):
            pane = strip[:, col * 128:(col + 1) * 128]
            assert np.abs(pane[:96].astype(int) - frames[i, :, :128]).mean() < 4  # the video is lossy
            assert np.abs(pane[96:].astype(int) - frames[i, :, 128:]).mean() < 4


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_killed_record_leaves_a_playable_file(tmp_path, ckpt, sig):
    prefix = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "worldmodel", "record", "--checkpoint", ckpt, "--device", "cpu",
                             "--policy", "explorer", "--frames", "100000", "--out", str(prefix), "--no-progress"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    timings = paths(prefix)["timings"]
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if timings.exists() and len(timings.read_text().splitlines()) > 12:
                break
            assert proc.poll() is None, "record exited early"
            time.sleep(0.1)
    finally:
        proc.send_signal(getattr(signal, sig))
        rc = proc.wait(timeout=60)
    assert rc == (-9 if sig == "SIGKILL" else 128 + signal.SIGTERM)  # SIGTERM unwinds like Ctrl-C
    deadline = time.monotonic() + 10  # the explorer's game engine goes with it
    while engines_of(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engines_of(proc.pid) == []
    n_actions = len(load_actions(paths(prefix)["actions"]))
    assert n_actions >= 12
    deadline, n = time.monotonic() + 20, -1
    while time.monotonic() < deadline:  # ffmpeg finishes the file after its pipe closes
        try:
            n = len(read_video(paths(prefix)["video"]))
        except Exception:
            n = -1
        if n >= n_actions - 1:
            break
        time.sleep(0.3)
    assert abs(n - n_actions) <= 1, (n, n_actions)
    frames, acts, _ = load_recording(prefix)
    assert len(frames) == len(acts) >= n_actions - 1


def test_malformed_script_names_the_line(tmp_path, capsys, ckpt):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"move": 1, "repeat": 3}\n\n{"move": 1, "turn": 99}\n')
    rc = main(["record", "--checkpoint", ckpt, "--actions", str(bad), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "line 3" in err and "bad.jsonl" in err and "turn" in err
    assert not paths(tmp_path / "x")["video"].exists()


def test_malformed_script_from_the_console_script(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"move": 1}\nnot json\n')
    r = subprocess.run([sys.executable, "-m", "worldmodel", "record", "--preset", "tiny", "--actions", str(bad),
                        "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "line 2" in r.stderr


def test_unknown_preset_is_a_clear_error(tmp_path, capsys):
    save_actions(tmp_path / "a.jsonl", SCRIPT)
    rc = main(["record", "--preset", "huge", "--actions", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "unknown preset 'huge'" in err and "tiny" in err


def test_missing_default_checkpoint_says_what_to_do(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli_common, "DEFAULT_CHECKPOINT", "checkpoints/no-such-checkpoint")
    monkeypatch.chdir(tmp_path)
    save_actions(tmp_path / "a.jsonl", SCRIPT)
    rc = main(["record", "--actions", "a.jsonl", "--out", "x"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "missing" in err and "--preset" in err and "--checkpoint" in err


def test_side_by_side_needs_the_game(tmp_path, capsys, ckpt):
    rc = main(["record", "--checkpoint", ckpt, "--policy", "explorer", "--start-clip", "0", "--side-by-side",
               "--out", str(tmp_path / "x")])
    assert rc == 2 and "--side-by-side" in capsys.readouterr().err
