"""The recording format (worldmodel/data/recording.py): round trips, crash safety, the OpenCV fallback."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import cv2
import numpy as np
import pytest

from worldmodel.data import recording
from worldmodel.game.action import Action, load_actions, save_actions
from worldmodel.metrics import psnr
from worldmodel.data.recording import Recorder, load_recording, paths, read_video, split_prefix


def smooth_frames(n, h=96, w=128, seed=0):
    """Moving smooth colour gradients: easy for H.264, so decoded frames stay close to the input."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for i in range(n):
        r = 128 + 100 * np.sin((xx + 3 * i) / 17.0)
        g = 128 + 100 * np.cos((yy - 2 * i) / 13.0)
        b = 128 + 60 * np.sin((xx + yy + i) / 23.0 + seed)
        out.append(np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8))
    return out


ACTIONS = [Action(move=1)] * 9 + [Action(turn=2.5)] * 3 + [Action(attack=True)] + [Action()] * 7


def test_round_trip_frames_actions_and_meta(tmp_path):
    frames = smooth_frames(len(ACTIONS))
    with Recorder(tmp_path / "run", 35, (96, 128), {"model": "test", "seed": 3}) as rec:
        for i, (f, a) in enumerate(zip(frames, ACTIONS)):
            rec.add(f, a, latency_ms=10.0 + i)
    p = paths(tmp_path / "run")
    assert all(p[k].exists() for k in ("video", "actions", "meta", "timings"))
    got, acts, meta = load_recording(tmp_path / "run")
    assert acts == ACTIONS
    assert got.shape == (len(ACTIONS), 96, 128, 3)
    assert min(psnr(a, b) for a, b in zip(got, frames)) > 30
    assert meta["frames"] == len(ACTIONS) and meta["complete"] is True
    assert meta["fps"] == 35 and meta["frame_size"] == [96, 128] and meta["model"] == "test" and meta["seed"] == 3
    assert meta["codec"].startswith("h264")
    # the closed actions file is exactly what save_actions writes (run-length encoded, no padding)
    save_actions(tmp_path / "ref.jsonl", ACTIONS)
    assert p["actions"].read_text() == (tmp_path / "ref.jsonl").read_text()
    assert len(p["actions"].read_text().splitlines()) == 4
    lines = p["timings"].read_text().splitlines()
    assert lines[0] == "frame,latency_ms" and len(lines) == len(ACTIONS) + 1 and lines[1] == "0,10.000"
    # the prefix may be given with any of the suffixes
    assert split_prefix(p["video"]) == split_prefix(p["meta"]) == tmp_path / "run"


def test_odd_frame_size_round_trips(tmp_path):
    frames = [f[:95, :127] for f in smooth_frames(5)]
    with Recorder(tmp_path / "odd.mp4", 35, (95, 127), {}) as rec:
        for f in frames:
            rec.add(f, Action())
    got, acts, _ = load_recording(tmp_path / "odd")
    assert got.shape == (5, 95, 127, 3) and len(acts) == 5


def test_files_are_valid_while_recording(tmp_path):
    rec = Recorder(tmp_path / "live", 35, (96, 128), {}, meta_every_s=0.0)
    frames = smooth_frames(len(ACTIONS))
    for f, a in zip(frames, ACTIONS):
        rec.add(f, a)
    try:
        # before close: the padded in-place lines already parse to every action so far
        assert load_actions(paths(tmp_path / "live")["actions"]) == ACTIONS
        meta = json.loads(paths(tmp_path / "live")["meta"].read_text())
        assert meta["complete"] is False and meta["frames"] == len(ACTIONS)
    finally:
        rec.close()
    assert json.loads(paths(tmp_path / "live")["meta"].read_text())["complete"] is True


def test_bad_frames_and_actions_are_refused(tmp_path):
    with Recorder(tmp_path / "bad", 35, (96, 128), {}) as rec:
        with pytest.raises(ValueError, match="uint8 frame of shape"):
            rec.add(np.zeros((96, 127, 3), np.uint8), Action())
        with pytest.raises(ValueError, match="uint8"):
            rec.add(np.zeros((96, 128, 3), np.float32), Action())
        with pytest.raises(ValueError, match="Action"):
            rec.add(np.zeros((96, 128, 3), np.uint8), {"move": 1})
    with pytest.raises(TypeError):
        Recorder(tmp_path / "m", 35, (96, 128), {"x": object()})


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np
    from worldmodel.game.action import Action
    from worldmodel.data.recording import Recorder
    rec = Recorder(sys.argv[1], 35, (96, 128), {"kind": "kill test"})
    yy, xx = np.mgrid[0:96, 0:128]
    i = 0
    while True:
        f = np.stack([(xx + 3 * i) % 256, (yy * 2 + i) % 256, (xx + yy) % 256], -1).astype(np.uint8)
        rec.add(f, Action(move=1) if (i // 5) % 2 else Action(turn=1.5))
        i += 1
        print(i, flush=True)
        time.sleep(0.005)
""")


def wait_for_video(prefix, want: int, timeout=20.0):
    """After a kill, ffmpeg (in its own session) finishes the file by itself; wait until it decodes."""
    deadline = time.monotonic() + timeout
    n = -1
    while time.monotonic() < deadline:
        try:
            n = len(read_video(paths(prefix)["video"]))
        except Exception:
            n = -1
        if n >= want:
            return n
        time.sleep(0.3)
    return n


def test_killed_recorder_leaves_a_playable_file(tmp_path):
    prefix = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(prefix)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in proc.stdout:
            if int(line) >= 40:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    acts = load_actions(paths(prefix)["actions"])  # the padded, never-compacted file parses
    assert len(acts) >= 40
    n = wait_for_video(prefix, len(acts) - 1)
    assert abs(n - len(acts)) <= 1, (n, len(acts))  # at most the frame being written is lost
    frames, acts2, meta = load_recording(prefix)
    assert len(frames) == len(acts2) >= 39 and meta["complete"] is False
    # playable by other readers too: OpenCV decodes it
    cap = cv2.VideoCapture(str(paths(prefix)["video"]))
    count = 0
    while cap.read()[0]:
        count += 1
    cap.release()
    assert count == n


def test_opencv_fallback_warns_loudly(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(recording, "ffmpeg_exe", lambda: None)
    frames = smooth_frames(6)
    with pytest.warns(RuntimeWarning, match="mp4v"):
        rec = Recorder(tmp_path / "cv", 35, (96, 128), {})
    with rec:
        for f in frames:
            rec.add(f, Action())
    assert "WARNING" in capsys.readouterr().err
    got, acts, meta = load_recording(tmp_path / "cv")
    assert len(got) == len(acts) == 6 and "mp4v" in meta["codec"]
