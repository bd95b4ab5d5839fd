"""The faults a hostile new user found (issue 18), each reproduced as the user met it: nothing already
trained, recorded or collected is lost or overwritten, nothing grows without bound, every bad input
or bad place ends in one line naming it (exit code 2, no traceback) before the work starts."""
import errno
import itertools
import json
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from worldmodel.game import action as A
from worldmodel.game.action import Action
from worldmodel.cli import main
from helpers import engines_of
from test_train import TINY_SET, make_dataset

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "data")


@pytest.fixture(scope="module")
def ae(tmp_path_factory, data):
    """A `train autoencoder` run folder (one step), for the transformer runs."""
    run = tmp_path_factory.mktemp("ae") / "ae"
    assert main(["train", "autoencoder", "--data", str(data), "--out", str(run), "--steps", "1", "--batch", "8",
                 "--threads", "1", "--no-progress", *TINY_SET]) == 0
    return run


def train_model_args(data, ae, run, *more) -> list[str]:
    return ["train", "model", "--data", str(data), "--autoencoder", str(ae), "--out", str(run), "--batch", "2",
            "--val-clips", "2", "--threads", "1", "--no-progress", *TINY_SET, *more]


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody may create files in: chmod 555 for a normal user; root ignores permissions, so for
    root /sys (sysfs refuses new files to everyone)."""
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    if Path("/sys").is_dir():
        try:
            tempfile.TemporaryFile(dir="/sys").close()
        except OSError:
            yield Path("/sys")
            return
    pytest.skip("no read-only place to test with")


def one_line_error(capsys, *words) -> str:
    """The command's stderr: exactly one line, no traceback, holding every word."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for w in words:
        assert str(w) in err, (w, err)
    return err


def no_work(monkeypatch, *modules):
    """Loading a model (the start of the work) fails the test: the error must come before it."""
    def refuse(*a, **k):
        raise AssertionError("the work started before the bad input was refused")
    for m in modules:
        monkeypatch.setattr(m, "load_model", refuse)


# -- 1. a run folder that holds a run is not silently overwritten -------------------------------------------------

def test_train_autoencoder_refuses_a_folder_holding_a_run_unless_resume_or_overwrite(tmp_path, data, capsys):
    run = tmp_path / "ae"
    base = ["train", "autoencoder", "--data", str(data), "--out", str(run), "--batch", "8", "--ckpt-every", "1",
            "--threads", "1", "--no-progress", *TINY_SET]
    assert main([*base, "--steps", "2"]) == 0
    weights = (run / "autoencoder.safetensors").read_bytes()
    capsys.readouterr()
    assert main([*base, "--steps", "1"]) == 2  # the reproduction: a second run into the same folder
    one_line_error(capsys, run, "--resume", "--overwrite")
    assert (run / "autoencoder.safetensors").read_bytes() == weights
    assert main([*base, "--steps", "3", "--resume", "--batch", "4"]) == 2  # resumed with another batch
    one_line_error(capsys, run, "started with --batch 8")
    assert main([*base, "--steps", "3", "--resume"]) == 0  # the same settings, more steps
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]
    assert main([*base, "--steps", "1", "--overwrite"]) == 0  # a new run: nothing of the old one is left
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001"]
    assert json.loads((run / "config.json").read_text())["info"]["steps"] == 1


def test_train_model_refuses_to_replace_an_export(tmp_path, data, ae, capsys):
    run = tmp_path / "dit"
    base = train_model_args(data, ae, run, "--eval-clips", "1")
    assert main([*base, "--steps", "2"]) == 0
    export = (run / "export" / "transformer.safetensors").read_bytes()
    capsys.readouterr()
    assert main([*base, "--steps", "1"]) == 2
    one_line_error(capsys, run, "--resume", "--overwrite")
    assert (run / "export" / "transformer.safetensors").read_bytes() == export
    assert main([*base, "--steps", "1", "--resume", "--set", "dim=32"]) == 2  # another model is not a resume
    one_line_error(capsys, run, "--set dim=64")
    assert main([*base, "--steps", "1", "--overwrite"]) == 0
    assert json.loads((run / "export" / "config.json").read_text())["info"]["steps"] == 1


# -- 2. action scripts are read as a stream --------------------------------------------------------------------

def test_action_scripts_stream_with_flat_memory(tmp_path):
    p = tmp_path / "long.jsonl"
    p.write_text("".join(f'{{"move": 1, "turn": {i % 5}.0, "repeat": 50000}}\n' for i in range(60)))
    tracemalloc.start()
    script = A.ActionScript(p)  # 3,000,000 frames: checked line by line, never expanded
    first = list(itertools.islice(script, 50001))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(script) == 3_000_000 and first[0] == Action(move=1) and first[50000] == Action(move=1, turn=1.0)
    assert peak < 2_000_000, f"{peak} bytes for a 3,000,000-frame script"


def test_absurd_repeat_is_refused_with_its_line(tmp_path, ckpt, capsys, monkeypatch):
    import worldmodel.evaluation.record as record

    p = tmp_path / "huge.jsonl"
    p.write_text('{"move": 1}\n{"move": 1, "repeat": 1000000000000}\n')
    no_work(monkeypatch, record)
    assert main(["record", "--checkpoint", ckpt, "--actions", str(p), "--frames", "10", "--out",
                 str(tmp_path / "r")]) == 2
    one_line_error(capsys, p, "line 2", "24 hours")
    # the whole script counts: many lines, each within the limit, are refused where they pass it
    p.write_text(f'{{"move": 1, "repeat": {A.MAX_SCRIPT_FRAMES // 2}}}\n' * 3)
    with pytest.raises(A.ActionScriptError, match="line 3"):
        A.ActionScript(p)


def test_a_binary_action_script_names_the_file_and_line(tmp_path, ckpt, capsys, monkeypatch):
    import worldmodel.evaluation.record as record

    p = tmp_path / "binary.jsonl"
    p.write_bytes(b'{"move": 1}\n' + bytes(range(128, 256)) + b"\n")
    no_work(monkeypatch, record)
    assert main(["record", "--checkpoint", ckpt, "--actions", str(p), "--out", str(tmp_path / "r")]) == 2
    one_line_error(capsys, p, "line 2", "not UTF-8")


# -- 3. every output path is checked before the work starts ----------------------------------------------------

def bad_places(tmp_path, read_only_dir):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder.json").mkdir()
    return {"folder": tmp_path / "a_folder.json", "under a file": tmp_path / "a_file" / "out.json",
            "read-only": read_only_dir / "out.json"}


@pytest.mark.parametrize("place", ["folder", "under a file", "read-only"])
def test_play_report_is_checked_before_the_session(tmp_path, ckpt, capsys, monkeypatch, read_only_dir, place):
    from worldmodel.play import command

    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    monkeypatch.setattr(command, "build_game", lambda args: pytest.fail("the session started"))
    report = bad_places(tmp_path, read_only_dir)[place]
    script = tmp_path / "s.jsonl"
    script.write_text('{"move": 1}\n')
    assert main(["play", "--checkpoint", ckpt, "--autoplay", str(script), "--max-frames", "3",
                 "--report", str(report)]) == 2
    one_line_error(capsys, "--report", report)


@pytest.mark.parametrize("place", ["folder", "under a file", "read-only"])
def test_bench_out_is_checked_before_the_benchmark(tmp_path, capsys, monkeypatch, read_only_dir, place):
    import worldmodel.evaluation.bench as bench

    no_work(monkeypatch, bench)
    out = bad_places(tmp_path, read_only_dir)[place]
    assert main(["bench", "--preset", "tiny", "--frames", "3", "--out", str(out)]) == 2
    one_line_error(capsys, "--out", out)
    assert not out.with_suffix(".png").exists()


def test_bench_out_checks_its_png_too(tmp_path, capsys, monkeypatch):
    import worldmodel.evaluation.bench as bench

    no_work(monkeypatch, bench)
    (tmp_path / "b.png").mkdir()
    assert main(["bench", "--preset", "tiny", "--frames", "3", "--out", str(tmp_path / "b.json")]) == 2
    one_line_error(capsys, tmp_path / "b.png")


def test_record_eval_train_collect_outputs_are_checked_first(tmp_path, ckpt, data, capsys, monkeypatch,
                                                              read_only_dir):
    import worldmodel.evaluation.evaluate as evaluate
    import worldmodel.evaluation.record as record

    no_work(monkeypatch, record, evaluate)
    (tmp_path / "a_file").write_text("x")
    script = tmp_path / "s.jsonl"
    script.write_text('{"move": 1}\n')
    assert main(["record", "--checkpoint", ckpt, "--actions", str(script), "--out",
                 str(tmp_path / "a_file" / "rec")]) == 2
    one_line_error(capsys, "a_file is a file")
    assert main(["record", "--checkpoint", ckpt, "--actions", str(script), "--out", str(read_only_dir / "rec")]) == 2
    one_line_error(capsys, read_only_dir)
    assert main(["eval", "--checkpoint", ckpt, "--out", str(tmp_path / "a_file")]) == 2
    one_line_error(capsys, "is a file, not a folder")
    assert main(["train", "autoencoder", "--data", str(data), "--out", str(tmp_path / "a_file" / "run"),
                 "--no-progress", *TINY_SET]) == 2
    one_line_error(capsys, "a_file is a file")
    assert main(["collect", "--frames", "10", "--out", str(tmp_path / "a_file")]) == 2  # was "[Errno 17] File exists"
    one_line_error(capsys, "--out", "a_file", "is a file, not a folder")


# -- 4. one line, exit code 2, no traceback ---------------------------------------------------------------------

@pytest.mark.parametrize("command", ["record", "play", "eval"])
def test_triton_attention_on_a_cpu_is_one_line(tmp_path, ckpt, capsys, monkeypatch, command):
    from worldmodel import kernels
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    # what the kernels answer on a CPU without the Triton interpreter (which test_kernels turns on for the
    # whole test process, and which cannot be turned off once triton has read it)
    monkeypatch.setattr(kernels, "_triton_reason", lambda device: "triton backend: needs a CUDA GPU (on CPU only "
                                                                  "through the slow Triton interpreter)")
    script = tmp_path / "s.jsonl"
    script.write_text('{"move": 1}\n')
    args = {"record": ["--actions", str(script), "--out", str(tmp_path / "r")],
            "play": ["--autoplay", str(script), "--max-frames", "2"],
            "eval": ["--out", str(tmp_path / "e"), "--episodes", "1", "--stability-frames", "0"]}[command]
    assert main([command, "--checkpoint", ckpt, "--device", "cpu", "--attention", "triton", *args]) == 2
    one_line_error(capsys, "triton backend")


@pytest.mark.parametrize("command", ["record", "play", "bench", "train", "distill"])
def test_an_unknown_device_is_one_line(tmp_path, ckpt, data, capsys, monkeypatch, command):
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    script = tmp_path / "s.jsonl"
    script.write_text('{"move": 1}\n')
    args = {"record": ["--checkpoint", ckpt, "--actions", str(script), "--out", str(tmp_path / "r")],
            "play": ["--checkpoint", ckpt, "--autoplay", str(script), "--max-frames", "2"],
            "bench": ["--checkpoint", ckpt, "--frames", "3", "--out", str(tmp_path / "b.json")],
            "train": ["autoencoder", "--data", str(data), "--out", str(tmp_path / "t"), "--steps", "1",
                      "--no-progress", *TINY_SET],
            "distill": ["--teacher", ckpt, "--data", str(data), "--out", str(tmp_path / "d")]}[command]
    assert main([command, *args, "--device", "gpu"]) == 2
    one_line_error(capsys, "unknown device 'gpu'")


def test_a_truncated_latent_cache_is_encoded_again_on_resume(tmp_path, data, ae, capsys):
    run = tmp_path / "dit"
    base = train_model_args(data, ae, run, "--eval-clips", "0", "--ckpt-every", "1")
    assert main([*base, "--steps", "1"]) == 0
    cache = run / "cache" / "train_latents.safetensors"
    whole = cache.read_bytes()
    cache.write_bytes(whole[:len(whole) // 2])
    capsys.readouterr()
    assert main([*base, "--steps", "2", "--resume"]) == 0
    assert "encoding the latents again" in capsys.readouterr().err
    assert cache.read_bytes() == whole  # encoded again, the same latents


def test_killing_collect_leaves_its_workers_quiet(tmp_path):
    # kill -9 of the main process alone: its workers used to play their episode to the end, then print
    # screens of BrokenPipe tracebacks sending it to the dead process
    root = tmp_path / "d"
    argv = [sys.executable, "-m", "worldmodel", "collect", "--frames", "2000", "--out", str(root), "--maps",
            "MAP01,MAP02", "--frame-size", "24x32", "--episode-frames", "500", "--shard-frames", "25",
            "--warmup-frames", "0", "--workers", "2", "--no-progress"]
    err = tmp_path / "stderr.txt"
    with open(err, "w") as f:
        proc = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=f)
    workers, engines = [], []
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:  # until the workers are playing
            if (root / "shards").is_dir() and any(p.suffix == ".npz" for p in (root / "shards").iterdir()):
                break
            time.sleep(0.05)
        workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                  text=True).stdout.split()]
        engines = [e for w in workers for e in engines_of(w)]
        assert workers and engines, "the workers were not playing"
        proc.kill()  # the main process only
        proc.wait()
        deadline = time.time() + 60
        while time.time() < deadline and any(_alive(w) for w in workers + engines):
            time.sleep(0.1)
        survivors = [_describe(p) for p in workers + engines if _alive(p)]
        assert not survivors, f"outlived the main process: {survivors}; stderr: {err.read_text()[-2000:]}"
    finally:
        for w in workers + engines:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = err.read_text()
    assert "Traceback" not in text and "BrokenPipe" not in text, text[-3000:]


def _describe(pid: int) -> str:
    """pid, state and command line of a live process, for a failure message."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().split(")")[-1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
        with open(f"/proc/{pid}/wchan") as f:
            wchan = f.read()
    except OSError as e:
        return f"{pid} ({e})"
    return f"{pid} {state} wchan={wchan} {cmd}"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# -- 5. clear messages ------------------------------------------------------------------------------------------

def fails_after(n: int, real, counted=lambda *args: True):
    """`real` (a system call) as on a disk that fills up: from its (n+1)-th `counted` call on, ENOSPC."""
    calls = 0

    def call(*args):
        nonlocal calls
        if counted(*args):
            calls += 1
            if calls > n:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args)
    return call


def test_a_full_disk_in_collect_names_the_file_and_keeps_the_shards(tmp_path, capsys, monkeypatch):
    from worldmodel.data import verify
    root = tmp_path / "d"
    argv = ["collect", "--frames", "100", "--out", str(root), "--maps", "MAP01", "--frame-size", "24x32",
            "--episode-frames", "100", "--shard-frames", "25", "--warmup-frames", "0", "--workers", "0",
            "--no-progress"]
    # files are written atomically, each fsynced: the manifest, collect.json and two shards fit, the third
    # shard finds the disk full
    monkeypatch.setattr(os, "fsync", fails_after(4, os.fsync, lambda fd: stat.S_ISREG(os.fstat(fd).st_mode)))
    assert main(argv) == 2
    one_line_error(capsys, root / "shards" / "ep000000-0002.npz", "disk is full")
    monkeypatch.undo()
    assert sorted(p.name for p in (root / "shards").iterdir()) == ["ep000000-0000.npz", "ep000000-0001.npz"]
    assert main(argv) == 0  # space again: the same command finishes it, keeping what was written
    assert "resuming: 50 frames" in capsys.readouterr().err
    assert verify.verify_dataset(root)["frames"] == 100


def test_a_full_disk_in_record_names_the_file_and_keeps_the_recording(tmp_path, ckpt, capsys, monkeypatch):
    from worldmodel.data.recording import load_recording, paths

    script = tmp_path / "s.jsonl"
    script.write_text('{"move": 1, "repeat": 5}\n{"turn": 3.0, "repeat": 20}\n')
    prefix = tmp_path / "rec"
    monkeypatch.setattr(os, "pwrite", fails_after(8, os.pwrite))  # the actions log: one pwrite a frame
    assert main(["record", "--checkpoint", ckpt, "--device", "cpu", "--actions", str(script), "--out", str(prefix),
                 "--no-progress"]) == 2
    one_line_error(capsys, paths(prefix)["actions"], "disk is full")
    monkeypatch.undo()
    frames, actions, meta = load_recording(prefix)
    assert len(frames) == len(actions) == 8 and actions[:5] == [Action(move=1)] * 5
    assert meta["complete"] is False and meta["interrupted"] == "DiskFullError"


def test_ffmpeg_finding_the_disk_full_is_one_line(tmp_path, ckpt, capsys, monkeypatch):
    from worldmodel.data import recording
    # the video is the big file: on a full disk ffmpeg is the first to fail, and says so on its stderr
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\nhead -c 100000 > /dev/null\n"
                    "echo '[out#0/mp4] Error muxing a packet: No space left on device' >&2\nexit 228\n")
    fake.chmod(0o755)
    monkeypatch.setattr(recording, "ffmpeg_exe", lambda: str(fake))
    script = tmp_path / "s.jsonl"
    script.write_text('{"move": 1, "repeat": 30}\n')
    prefix = tmp_path / "rec"
    assert main(["record", "--checkpoint", ckpt, "--device", "cpu", "--actions", str(script), "--out", str(prefix),
                 "--no-progress"]) == 2
    one_line_error(capsys, recording.paths(prefix)["video"], "disk is full")
    meta = json.loads(recording.paths(prefix)["meta"].read_text())
    assert meta["complete"] is False and meta["interrupted"] == "DiskFullError"


@pytest.mark.parametrize("argv, flag", [
    (["autoencoder", "--batch", "0"], "--batch"),
    (["autoencoder", "--steps", "0"], "--steps"),
    (["autoencoder", "--val-every", "0"], "--val-every"),
    (["autoencoder", "--max-frames", "0"], "--max-frames"),
    (["model", "--autoencoder", "AE", "--batch", "-1"], "--batch"),
    (["model", "--autoencoder", "AE", "--steps", "0"], "--steps"),
    (["model", "--autoencoder", "AE", "--clip-stride", "0"], "--clip-stride"),
])
def test_non_positive_sizes_are_refused_before_the_data_is_read(tmp_path, ae, capsys, argv, flag):
    argv = [str(ae) if a == "AE" else a for a in argv]
    # --data names no dataset: the size must be refused first
    assert main(["train", *argv, "--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "run"),
                 "--no-progress", *TINY_SET]) == 2
    one_line_error(capsys, flag, "must be at least")


def test_numpy_numbers_make_actions():
    assert Action(turn=np.float32(3)) == Action(turn=3.0)
    assert Action(move=np.int64(1), strafe=np.int8(-1), attack=np.bool_(True)) == Action(move=1, strafe=-1,
                                                                                          attack=True)
    assert Action(turn=np.float64(-2.5)).turn == -2.5
    with pytest.raises(ValueError):
        Action(move=np.int64(2))
    from test_engine import small_model

    wm = small_model()  # and the engine's settings
    wm.steps, wm.speculative_tolerance, wm.seed = np.int64(3), np.float32(0.25), np.int32(7)
    assert (wm.steps, wm.speculative_tolerance, wm.seed) == (3, 0.25, 7) and type(wm.steps) is int


def test_a_bad_shard_names_its_dataset_folder(tmp_path, capsys):
    from worldmodel.errors import UserError
    from worldmodel.model.autoencoder import Autoencoder
    from worldmodel.training.clips import encode_dataset
    from worldmodel.training.config import parse_overrides, resolve_config
    data = make_dataset(tmp_path / "data")
    shard = data / "shards" / "ep000001-000.npz"
    shard.write_bytes(shard.read_bytes()[:200])
    assert main(["train", "autoencoder", "--data", str(data), "--out", str(tmp_path / "run"), "--no-progress",
                 *TINY_SET]) == 2
    one_line_error(capsys, shard)
    cfg = resolve_config("tiny", parse_overrides(TINY_SET[1::2]))
    with pytest.raises(UserError, match=re.escape(str(shard))):  # what distill reads its clips with
        encode_dataset(Autoencoder(cfg.autoencoder), data, "train", 3, progress=False)


def test_replaying_a_garbage_file_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    assert main(["play", "--replay", str(junk)]) == 2
    err = one_line_error(capsys, junk, "Invalid data")
    assert "ffmpeg version" not in err


# -- 6. the minor ones -----------------------------------------------------------------------------------------

def test_an_interrupted_recording_says_it_is_not_complete(tmp_path, ckpt):
    from worldmodel.data.recording import load_recording, paths

    script = tmp_path / "s.jsonl"
    script.write_text('{"move": 1, "repeat": 100000}\n')
    prefix = tmp_path / "rec"
    proc = subprocess.Popen([sys.executable, "-m", "worldmodel", "record", "--checkpoint", ckpt, "--device", "cpu",
                             "--actions", str(script), "--out", str(prefix), "--no-progress"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            # Ctrl-C reaches it even when pytest itself runs in the background (which
                            # starts with SIGINT ignored, and children inherit that)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 300  # a loaded machine takes long to start the game and the model
        while time.time() < deadline and proc.poll() is None:
            try:
                if json.loads(paths(prefix)["meta"].read_text())["frames"] >= 5:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        else:
            assert proc.poll() is not None, "the recording did not reach 5 frames in 300 s"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err.decode()[-2000:]
    frames, actions, meta = load_recording(prefix)
    assert meta["complete"] is False and meta["interrupted"] == "KeyboardInterrupt"
    assert meta["frames"] == len(actions) >= 5 and len(frames) >= len(actions) - 1  # what was recorded is kept


def test_data_verify_refuses_an_empty_dataset_and_flags_an_incomplete_one(tmp_path, capsys):
    from worldmodel.data import writer
    empty = tmp_path / "empty"
    writer.write_manifest(empty, writer.new_manifest((24, 32)))
    assert main(["data", "verify", str(empty)]) == 2
    one_line_error(capsys, empty, "no frames")
    part = make_dataset(tmp_path / "part")  # 144 frames of a collection that asked for 20,000
    (part / "collect.json").write_text(json.dumps({"frames": 20000}))
    assert main(["data", "verify", str(part)]) == 1
    out, err = capsys.readouterr()
    assert "OK" not in out and "INCOMPLETE (144 of the 20000 frames collected)" in out and "collect" in err


def test_distill_accepts_only_the_student_steps_its_help_names(tmp_path, capsys):
    assert main(["distill", "--teacher", str(tmp_path / "none"), "--data", str(tmp_path / "none"),
                 "--out", str(tmp_path / "d"), "--steps-student", "3"]) == 2
    one_line_error(capsys, "--steps-student", "1, 2 or 4")


def test_reset_encodes_only_the_frames_the_cache_keeps():
    from test_engine import context, small_model

    wm = small_model()
    frames, actions = context(wm, n=1000)
    actions = [Action(turn=float(i % 7)) for i in range(1000)]
    encoded = []
    encode = wm.autoencoder.encode
    wm.autoencoder.encode = lambda x: encoded.append(len(x)) or encode(x)
    wm.reset(frames, actions)
    assert sum(encoded) == wm.cfg.cache_frames  # sinks + window, not 1000
    after_all = wm.step(Action(move=1))
    keep = list(range(wm.cfg.sink_frames)) + list(range(1000 - wm.cfg.window_frames, 1000))
    wm.reset(frames[keep], [actions[i] for i in keep])
    assert np.array_equal(wm.step(Action(move=1)), after_all)  # the same context as before
