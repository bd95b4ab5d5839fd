"""The recording format shared by `worldmodel record` and the play UI's R key.

A recording is three files side by side, named from one prefix:

    PREFIX.mp4            the frames: H.264 (yuv420p) in a *fragmented* MP4 written by the ffmpeg that
                          ships inside the imageio-ffmpeg wheel; frames are piped to it as they come
                          (`-movflags frag_keyframe+empty_moov+default_base_moof`, one keyframe a second)
                          so a killed process still leaves a playable file.
    PREFIX.actions.jsonl  the action that produced each frame, in the action-script format of
                          `worldmodel.game.action` (one JSON object per line, runs of equal actions as one line
                          with "repeat": n) -- `worldmodel record --actions PREFIX.actions.jsonl` replays it.
                          Written as it goes: a run's line is rewritten in place (padded with spaces) each
                          time it grows, and the file is compacted on close.
    PREFIX.meta.json      a small JSON sidecar: format version, fps, frame size, frame count, whether the
                          recording was closed cleanly (`complete`: false for one cut short by Ctrl-C, a
                          kill or an error, `interrupted` saying by what), and whatever the caller passes in
                          `meta` (model, checkpoint, steps, seed, start scene, ...). Rewritten atomically
                          about once a second and on close.
    PREFIX.timings.csv    (only when `add` is given latencies) `frame,latency_ms`, one line per frame.

Frame i of the MP4 was produced by action i (expanded). A Ctrl-C or a kill loses at most the frame being
written: `load_recording` trims the two to the shorter if they differ by that one frame.

If no ffmpeg can be found the video falls back to OpenCV's `mp4v` writer with a loud warning: that file
is only readable after a clean `close()`.

    with Recorder("recordings/run1", fps=35, frame_size=(96, 128), meta={"model": "doom-tiny"}) as rec:
        rec.add(frame, action)        # uint8 (H, W, 3) RGB, worldmodel.Action
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from worldmodel.game.action import Action, load_actions
from worldmodel.errors import UserError, disk_full, writing
from worldmodel.files import atomic_write_text
from worldmodel.provenance import git_commit, now

FORMAT = "worldmodel-recording"
FORMAT_VERSION = 1
VIDEO_SUFFIX = ".mp4"
ACTIONS_SUFFIX = ".actions.jsonl"
META_SUFFIX = ".meta.json"
TIMINGS_SUFFIX = ".timings.csv"
_SUFFIXES = (ACTIONS_SUFFIX, META_SUFFIX, TIMINGS_SUFFIX, VIDEO_SUFFIX)
_REPEAT_DIGITS = 10  # room reserved on each actions line for "repeat": n (n < 10**10)
_NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device", as ffmpeg reports it


class RecordingError(RuntimeError):
    """The video encoder failed; the message carries ffmpeg's own error."""


# --------------------------------------------------------------------------------------------------
# paths and small helpers
# --------------------------------------------------------------------------------------------------
def split_prefix(path: str | os.PathLike) -> Path:
    """'runs/a', 'runs/a.mp4', 'runs/a.meta.json' or 'runs/a.actions.jsonl' -> Path('runs/a')."""
    s = str(path)
    for suffix in _SUFFIXES:
        if s.endswith(suffix):
            return Path(s[: -len(suffix)])
    return Path(s)


def paths(prefix: str | os.PathLike) -> dict[str, Path]:
    p = str(split_prefix(prefix))
    return {"video": Path(p + VIDEO_SUFFIX), "actions": Path(p + ACTIONS_SUFFIX), "meta": Path(p + META_SUFFIX),
            "timings": Path(p + TIMINGS_SUFFIX)}


def new_prefix(directory: str | os.PathLike = "recordings", stem: str = "play") -> Path:
    """A fresh timestamped prefix in `directory`, e.g. recordings/play-20250101-120000 (never an existing one)."""
    directory = Path(directory)
    base = f"{stem}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    prefix, n = directory / base, 1
    while any(p.exists() for p in paths(prefix).values()):
        n += 1
        prefix = directory / f"{base}-{n}"
    return prefix


def ffmpeg_exe() -> str | None:
    """The ffmpeg binary: imageio-ffmpeg's bundled one, else one on PATH, else None."""
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:
        return shutil.which("ffmpeg")


_hash_cache: dict[tuple, str] = {}


def checkpoint_hash(folder: str | os.PathLike | None) -> str | None:
    """sha256 over a checkpoint folder's config.json and *.safetensors (names and bytes), first 16 hex."""
    if folder is None:
        return None
    folder = Path(folder)
    files = sorted([*folder.glob("*.safetensors"), *folder.glob("config.json")])
    if not files:
        return None
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _hash_cache:
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        _hash_cache[key] = h.hexdigest()[:16]
    return _hash_cache[key]


def model_meta(wm) -> dict:
    """What a recording should say about the WorldModel that made it."""
    import torch

    return {"model": wm.name, "checkpoint": str(wm.folder) if wm.folder else None,
            "checkpoint_sha256": checkpoint_hash(wm.folder), "device": str(wm.device),
            "torch": torch.__version__, "commit": git_commit(),
            **{f.name: getattr(wm.settings, f.name) for f in dataclasses.fields(wm.settings)
               if f.metadata["recorded"]}}  # EngineSettings' recorded fields (worldmodel/inference/settings.py)


# --------------------------------------------------------------------------------------------------
# the actions log: JSON Lines, run-length encoded, on disk after every frame
# --------------------------------------------------------------------------------------------------
class _ActionLog:
    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.runs: list[list] = []  # [action, count]
        self.end = 0  # bytes written
        self.line_start = 0  # offset of the current run's line
        self.line_len = 0  # its length, including padding and "\n"

    def _line(self, action: Action, count: int) -> str:
        d = action.to_dict()
        if count > 1:
            d["repeat"] = count
        return json.dumps(d)

    def add(self, action: Action) -> None:
        """One more frame's action, on disk when this returns (counted only then: a failed write, a full
        disk, leaves the log as it was)."""
        if self.runs and self.runs[-1][0] == action:
            count = self.runs[-1][1] + 1
            data = (self._line(action, count).ljust(self.line_len - 1) + "\n").encode()
            if len(data) == self.line_len:  # rewrite the run's line in place: one small pwrite
                with writing(self.path):
                    os.pwrite(self.fd, data, self.line_start)
                self.runs[-1][1] = count
                return
            # (never: the line reserves room for a 10-digit repeat) start a new run
        room = len(self._line(action, 10 ** (_REPEAT_DIGITS - 1)))
        data = (self._line(action, 1).ljust(room) + "\n").encode()
        with writing(self.path):
            os.pwrite(self.fd, data, self.end)
        self.runs.append([action, 1])
        self.line_start, self.line_len = self.end, len(data)
        self.end += len(data)

    @property
    def count(self) -> int:
        return sum(c for _, c in self.runs)

    def close(self) -> None:
        if self.fd < 0:
            return
        os.close(self.fd)
        self.fd = -1
        # compact: the same lines without padding (what action.save_actions writes), atomically
        atomic_write_text(self.path, "".join(self._line(a, c) + "\n" for a, c in self.runs))


# --------------------------------------------------------------------------------------------------
# video writers
# --------------------------------------------------------------------------------------------------
class _FFmpegWriter:
    codec = "h264 (libx264, yuv420p, fragmented mp4)"

    def __init__(self, exe: str, path: Path, fps: float, frame_size: tuple[int, int], crf: int):
        h, w = frame_size
        self.path = path
        self.log = tempfile.TemporaryFile()
        gop = max(1, int(round(fps)))  # a keyframe (and so a finished fragment) every second
        cmd = [exe, "-hide_banner", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", f"{fps:g}", "-i", "pipe:0",
               "-an", "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2",  # yuv420p needs even sides
               "-c:v", "libx264", "-preset", "veryfast", "-tune", "zerolatency", "-crf", str(int(crf)),
               "-pix_fmt", "yuv420p", "-g", str(gop),
               "-movflags", "frag_keyframe+empty_moov+default_base_moof", "-flush_packets", "1",
               "-f", "mp4", str(path)]
        # its own session: a Ctrl-C in the terminal reaches only us, and we close the pipe cleanly; if we
        # are killed, ffmpeg sees the pipe close and finishes the file by itself
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self.log,
                                     bufsize=0, start_new_session=True)

    def _error(self) -> str:
        try:
            self.log.seek(0)
            return self.log.read().decode(errors="replace").strip()[-2000:]
        except Exception:
            return ""

    def write(self, frame: np.ndarray) -> None:
        view = memoryview(frame.tobytes())
        try:
            while view:
                n = os.write(self.proc.stdin.fileno(), view)
                view = view[n:]
        except (BrokenPipeError, OSError) as e:
            self.proc.wait(timeout=10)
            raise self._failure("stopped while writing", e) from None

    def _failure(self, what: str, cause) -> Exception:
        err = self._error()
        if _NO_SPACE in err:  # ffmpeg found the disk full (the video is the big file)
            return disk_full(self.path)
        return RecordingError(f"ffmpeg {what} {self.path}: {err or cause}")

    def close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            rc = self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        failure = self._failure(f"failed (exit {rc}) writing", rc) if rc != 0 else None
        self.log.close()
        if failure is not None:
            raise failure


class _OpenCVWriter:
    codec = "mpeg4 part 2 (OpenCV mp4v; unplayable if the process dies before close)"

    def __init__(self, path: Path, fps: float, frame_size: tuple[int, int]):
        import cv2

        h, w = frame_size
        self.cv2 = cv2
        self.writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (w, h))
        if not self.writer.isOpened():
            raise RecordingError(f"OpenCV cannot open {path} for writing (mp4v)")

    def write(self, frame: np.ndarray) -> None:
        self.writer.write(self.cv2.cvtColor(frame, self.cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        self.writer.release()


# --------------------------------------------------------------------------------------------------
# the recorder
# --------------------------------------------------------------------------------------------------
class Recorder:
    """Write frames and the actions that produced them as they come. `meta` (JSON-serialisable) goes
    into the sidecar. `crf`: H.264 quality (0 lossless .. 51; 17 is visually lossless)."""

    def __init__(self, path_prefix: str | os.PathLike, fps: float, frame_size: Sequence[int], meta: dict | None = None,
                 *, crf: int = 17, meta_every_s: float = 1.0):
        self.prefix = split_prefix(path_prefix)
        self.paths = paths(self.prefix)
        self.fps = float(fps)
        self.frame_size = (int(frame_size[0]), int(frame_size[1]))
        if self.fps <= 0 or min(self.frame_size) < 1:
            raise ValueError(f"bad recording settings: fps {fps}, frame size {frame_size}")
        self.meta_in = dict(meta or {})
        json.dumps(self.meta_in)  # fail now, not at the first meta write
        self.frames = 0
        self.closed = False
        self._meta_every = float(meta_every_s)
        self._last_meta = 0.0
        self._timings = None
        self.started = now()
        self.interrupted = None  # what cut the recording short, if anything
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self.actions = _ActionLog(self.paths["actions"])  # first: a place that cannot be written fails here

        exe = ffmpeg_exe()
        if exe is not None:
            self.video = _FFmpegWriter(exe, self.paths["video"], self.fps, self.frame_size, crf)
        else:
            msg = ("\n" + "!" * 78 + "\nWARNING: no ffmpeg found (pip install imageio-ffmpeg). Falling back to "
                   "OpenCV's mp4v writer:\n  the MP4 is NOT H.264 and is UNPLAYABLE if this process is killed "
                   "before it closes.\n" + "!" * 78)
            print(msg, file=sys.stderr, flush=True)
            warnings.warn("no ffmpeg: recording with OpenCV mp4v (not crash-safe)", RuntimeWarning, stacklevel=2)
            self.video = _OpenCVWriter(self.paths["video"], self.fps, self.frame_size)
        self._write_meta()

    # -- writing --------------------------------------------------------------------------------------
    def add(self, frame: np.ndarray, action: Action, latency_ms: float | None = None) -> None:
        """Append one frame (uint8 (H, W, 3) RGB) and the action that produced it; on disk when this returns
        (the video in ffmpeg's hands). `latency_ms`, if given, goes to PREFIX.timings.csv."""
        if self.closed:
            raise RuntimeError("Recorder.add() after close()")
        if not isinstance(action, Action):
            raise ValueError(f"Recorder.add needs an Action, got {type(action).__name__}")
        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.shape != (*self.frame_size, 3):
            raise ValueError(f"Recorder.add needs a uint8 frame of shape {(*self.frame_size, 3)}, got "
                             f"{frame.dtype} {frame.shape}")
        self.video.write(np.ascontiguousarray(frame))
        self.actions.add(action)
        with writing(self.paths["timings"]):
            if latency_ms is not None:
                if self._timings is None:
                    self._timings = open(self.paths["timings"], "w", buffering=1)
                    self._timings.write("frame,latency_ms\n")
                    for i in range(self.frames):  # frames added before the first timing have none
                        self._timings.write(f"{i},\n")
                self._timings.write(f"{self.frames},{float(latency_ms):.3f}\n")
            elif self._timings is not None:
                self._timings.write(f"{self.frames},\n")
        self.frames += 1
        now = time.monotonic()
        if now - self._last_meta >= self._meta_every:
            self._write_meta()

    def update_meta(self, **fields) -> None:
        """Add or change sidecar fields (written at the next periodic write and on close)."""
        json.dumps(fields)
        self.meta_in.update(fields)

    def _write_meta(self, complete: bool = False, sync: bool = False) -> None:
        self._last_meta = time.monotonic()
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "video": self.paths["video"].name,
                "actions": self.paths["actions"].name, "codec": self.video.codec, "fps": self.fps,
                "frame_size": list(self.frame_size), "frames": self.frames, "complete": complete,
                "started": self.started}
        if complete:
            meta["finished"] = now()
        elif self.interrupted:
            meta["interrupted"] = self.interrupted
        if self._timings is not None:
            meta["timings"] = self.paths["timings"].name
        meta.update({k: v for k, v in self.meta_in.items() if k not in meta})
        # the periodic writes do not wait on the disk (they run in the frame loop); the last one is durable
        atomic_write_text(self.paths["meta"], json.dumps(meta, indent=2) + "\n", sync=sync)

    def close(self) -> None:
        """Finish the video, compact the actions file and write the final sidecar: complete: true, unless
        the recording was cut short (`interrupted`) or a step of closing fails. Each step is tried; the
        first failure is raised after them."""
        if self.closed:
            return
        self.closed = True
        err = None
        steps = [self.video.close, self.actions.close] + ([self._timings.close] if self._timings is not None else [])
        for step in steps:
            try:
                step()
            except (RecordingError, UserError, OSError) as e:  # a full disk: the padded actions file is kept
                err = err or e
        try:
            self._write_meta(complete=err is None and self.interrupted is None, sync=True)
        except (UserError, OSError) as e:
            err = err or e
        if err is not None:
            raise err

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        self.interrupted = exc_type.__name__  # Ctrl-C, a kill (SystemExit), an error: what is written stays
        try:
            self.close()
        except Exception:  # the exception on its way out is the one to tell
            pass

    def __del__(self):
        try:
            if not self.closed:
                self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"Recorder({str(self.prefix)!r}, {self.frames} frames{', closed' if self.closed else ''})"


# --------------------------------------------------------------------------------------------------
# reading back
# --------------------------------------------------------------------------------------------------
def read_video(path: str | os.PathLike) -> np.ndarray:
    """Decode a video to uint8 (N, H, W, 3) RGB (through ffmpeg if there is one, else OpenCV)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such video")
    exe = ffmpeg_exe()
    if exe is not None:
        import imageio_ffmpeg

        gen = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
        try:
            info = next(gen)
            w, h = info["size"]
            frames = [np.frombuffer(b, np.uint8).reshape(h, w, 3) for b in gen]
        except (RuntimeError, OSError) as e:  # ffmpeg's whole stderr, banner and all: its last line says why
            said = [line.strip() for line in str(e).splitlines() if line.strip()]
            why = said[-1] if said else "no reason given"
            raise ValueError(f"{path}: not a video ffmpeg can read ({why})") from None
        return np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8)
    import cv2

    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(f, cv2.COLOR_BGR2RGB))
    cap.release()
    if not frames:
        raise ValueError(f"{path}: no frame could be decoded")
    return np.stack(frames)


def load_recording(prefix: str | os.PathLike, trim: bool = True) -> tuple[np.ndarray, list[Action], dict]:
    """(frames uint8 (N, H, W, 3), actions (N), meta). A recording cut short by a kill may hold one more
    frame than actions or the reverse; `trim` keeps the first min of the two."""
    p = paths(prefix)
    meta = json.loads(p["meta"].read_text()) if p["meta"].exists() else {}
    frames = read_video(p["video"])
    actions = load_actions(p["actions"]) if p["actions"].stat().st_size else []
    h, w = meta.get("frame_size", frames.shape[1:3])
    frames = frames[:, :h, :w]  # drop the padding to even sides
    if trim:
        n = min(len(frames), len(actions))
        frames, actions = frames[:n], actions[:n]
    return frames, actions, meta


def write_recording(prefix, frames: Iterable[np.ndarray], actions: Iterable[Action], fps: float,
                    meta: dict | None = None) -> Path:
    """Write a whole recording at once (for tools that already hold the frames)."""
    frames, actions = list(frames), list(actions)
    if len(frames) != len(actions) or not frames:
        raise ValueError(f"need as many actions as frames (and at least one): {len(frames)} vs {len(actions)}")
    with Recorder(prefix, fps, frames[0].shape[:2], meta) as rec:
        for f, a in zip(frames, actions):
            rec.add(f, a)
    return rec.prefix
