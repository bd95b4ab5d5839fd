"""The model thread: runs the game (`reset()`/`step()`) off the UI thread, one frame per tic.

A game whose frames come in two stages (`advance(action)`, then `render(advanced)`: the dream's
transformer passes, then its decoder) runs them as a pipeline (worldmodel/inference/pipeline.py) when its model
says so (`model.pipeline`, the engine's choice): the model thread advances frame t+1 while a render
thread decodes frame t, each on its own core. Frames reach the UI in order either way.

It paces itself at the game's frame rate: when the previous frame is done and the next tic is due, it
takes the action for the next frame from `action_source` (the input state the UI thread fills from
keys and mouse, or the autoplay script) and generates the frame. Finished frames go to the UI through a
queue (`poll()`); the UI waits for them at most a frame period at a time (`wait(timeout)`) and shows the
latest. Taking the action here, the moment the model is free, rather than handing it over from the UI
thread, saves two thread wake-ups per frame and samples the input as late as possible.

torch releases the GIL inside its ops, so the UI thread keeps running while a frame is generated.
Commands from the UI (restart, pause, the model's settings such as denoising steps: `configure`) are
applied between frames, never in the middle of one.
"""
from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from worldmodel.game.action import Action
from worldmodel.inference.pipeline import FramePipeline

WAKE_MARGIN = 0.001  # seconds: a tic that is due within this is started now


@dataclass
class Result:
    kind: str  # "reset", "step" or "end" (the action source ran out)
    index: int = 0  # frames generated since the loop started, this one included
    frame: np.ndarray | None = None
    companion: np.ndarray | None = None  # the real game beside the dream, when it runs in lockstep
    action: Action | None = None
    t_action: float = 0.0  # when the action was taken (the input sampled)
    t_end: float = 0.0  # when the frame was ready
    compute_s: float = 0.0
    error: BaseException | None = None
    info: dict = field(default_factory=dict)


class FrameWorker:
    """`start()` begins the loop; `request_reset()`, `pause()`, `configure()` steer it; `poll()` collects
    the finished frames; `close()` stops it after the frame in progress."""

    def __init__(self, game, action_source: Callable[[], Action | None], fps: float = 35.0,
                 max_frames: int | None = None, clock: Callable[[], float] = time.perf_counter, nice: int = 0):
        self.game = game
        self.action_source = action_source
        self.period = 1.0 / float(fps)
        self.max_frames = max_frames
        self.clock = clock
        self.nice = int(nice)
        self._results: queue.Queue = queue.Queue()
        self._cond = threading.Condition()
        self._pending: dict[str, Any] = {}  # changes to the model's settings, for the next frame
        self._reset = False
        self._paused = False
        self._stop = False
        self._started = False
        self.frames = 0  # frames generated (worker side)
        self.busy = False  # a reset or a step is running
        self.finished = False  # max_frames reached or the action source ran out
        self.wakeup = threading.Event()  # set when a result is ready
        self._thread = threading.Thread(target=self._run, name="worldmodel-frames", daemon=True)
        two_stage = hasattr(game, "advance") and hasattr(game, "render")
        self._advance_fn = game.advance if two_stage else game.step
        self._render_fn = game.render if two_stage else None
        self.pipelined = two_stage and game.model is not None and bool(game.model.pipeline)
        self._pipe: FramePipeline | None = None

    # -- UI side -----------------------------------------------------------------------------------
    def start(self) -> None:
        if not self._started:
            self._started = True
            self._pipe = FramePipeline(self._advance, self._render, self._rendered, threaded=self.pipelined,
                                       clock=self.clock)
            self._thread.start()

    def _notify(self, **changes) -> None:
        with self._cond:
            for k, v in changes.items():
                setattr(self, k, v)
            self._cond.notify_all()

    def request_reset(self) -> None:
        """Load a fresh start scene before the next frame."""
        self._notify(_reset=True)

    def pause(self, on: bool) -> None:
        self._notify(_paused=bool(on))

    def configure(self, **changes) -> None:
        """Change the game's model's settings (`WorldModel.configure`, e.g. steps=3) before the next frame
        starts. The values are checked now (ValueError; EngineSettings); the model's own limits when applied."""
        with self._cond:
            dataclasses.replace(self.game.model.settings, **{**self._pending, **changes})  # the check
            self._pending.update(changes)
            self._cond.notify_all()

    @property
    def settings(self):
        """The model's EngineSettings as its next frame runs them (the changes asked for included); None
        without a model."""
        if self.game.model is None:
            return None
        with self._cond:
            return dataclasses.replace(self.game.model.settings, **self._pending)

    def wait(self, timeout: float) -> bool:
        """Sleep until a result is ready or `timeout` seconds pass; True if a result is ready."""
        if timeout > 0:
            self.wakeup.wait(timeout)
        return not self._results.empty()

    def poll(self) -> list[Result]:
        self.wakeup.clear()  # cleared first: a result put after this sets it again
        out = []
        while True:
            try:
                out.append(self._results.get_nowait())
            except queue.Empty:
                return out

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the frame in progress; the render thread finishes what it holds and ends too."""
        self._notify(_stop=True)
        if self._started:
            self._thread.join(timeout)
            self._pipe.close(timeout)

    # -- worker side -------------------------------------------------------------------------------
    def _put(self, r: Result) -> None:
        self._results.put(r)
        self.wakeup.set()

    def _apply_pending(self) -> None:
        with self._cond:
            pending, self._pending = self._pending, {}
        if self.game.model is not None and pending:
            self.game.model.configure(**pending)

    def _renice(self) -> None:
        if self.nice and hasattr(os, "setpriority"):
            try:  # this thread (and the torch threads it starts) yield the CPU to the UI thread
                tid = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + self.nice)
            except OSError:
                pass

    def _run(self) -> None:
        self._renice()
        clock = self.clock
        next_due = clock()
        while True:
            with self._cond:
                while True:
                    if self._stop:
                        return
                    if self._reset or self._pending:
                        break
                    if self._paused or self.finished:
                        self._cond.wait()
                        continue
                    wait = next_due - WAKE_MARGIN - clock()
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                do_reset, self._reset = self._reset, False
                self.busy = True
            try:
                self._apply_pending()
                if do_reset:
                    self._do_reset()
                    next_due = clock()
                elif not (self._paused or self.finished) and clock() >= next_due - WAKE_MARGIN:
                    next_due = self._do_step(next_due)
            finally:
                self.busy = False

    def _do_reset(self) -> None:
        r = Result("reset", self.frames)
        r.t_action = self.clock()
        try:
            # the frames still being decoded finish first: a P-frame decoder decodes each frame against
            # the one shown before it, so the render thread must not decode an old frame after the reset
            self._pipe.flush()
            r.frame = self.game.reset()
            r.companion = self.game.companion_frame
        except BaseException as e:  # handed to the UI thread, which reports it
            r.error = e
        r.t_end = self.clock()
        r.compute_s = r.t_end - r.t_action
        self._pipe.put_rendered(None, r)  # after the frames still being rendered

    # stage 1 (this thread) and stage 2 (the render thread, or this one) of a frame
    def _advance(self, r: Result):
        out = self._advance_fn(r.action)
        r.companion = self.game.companion_frame
        if self.game.model is not None:
            r.info["stats"] = self.game.model.stats
        return out

    def _render(self, advanced):
        return advanced if self._render_fn is None else self._render_fn(advanced)

    def _rendered(self, frame, r: Result, times: dict) -> None:
        if r.kind == "step" and r.error is None:
            if isinstance(frame, BaseException):
                r.error = frame
                self.finished = True
            else:
                r.frame = frame
            r.t_end = times["t_done"]
            r.compute_s = r.t_end - r.t_action
            r.info["times"] = {"advance": times["advance"], "render": times["render"]}
        self._put(r)

    def _do_step(self, next_due: float) -> float:
        t_action = self.clock()
        try:
            action = self.action_source()
        except BaseException as e:
            self._pipe.put_rendered(None, Result("step", self.frames, error=e))
            self.finished = True
            return next_due
        if action is None:
            self.finished = True
            self._pipe.put_rendered(None, Result("end", self.frames))
            return next_due
        r = Result("step", self.frames + 1, action=action, t_action=t_action)
        try:
            self._pipe.submit(r, tag=r)
        except BaseException as e:
            r.error = e
            r.t_end = self.clock()
            self.finished = True
            self._pipe.put_rendered(None, r)
        self.frames += 1
        if self.max_frames is not None and self.frames >= self.max_frames:
            self.finished = True
            self._pipe.put_rendered(None, Result("end", self.frames))
        # the next tic is due one period after this one was, or now if the model is behind
        return max(next_due + self.period, t_action)
