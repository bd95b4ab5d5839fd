"""Two-stage frame pipeline: frame t is rendered (decoded, converted, handed out) on a second thread
while frame t+1 is being generated on the first.

A frame's work has two stages that depend on each other only through one small tensor:
  1. advance: the transformer's passes (denoise, commit) for the next action -> the frame's latent;
  2. render: the decoder turns the latent into pixels (and the caller may add its own conversion).
Stage 1 of frame t+1 needs the KV cache after frame t, not its pixels, so it can start as soon as
stage 1 of frame t is done. With `threaded=True` stage 2 runs on a thread of its own: throughput is
one frame per max(stage 1, stage 2) instead of per stage 1 + stage 2, and each stage runs on one core
with one intra-op thread (no OpenMP barriers between the cores, so another process busy on one core
slows the pipeline down by its share of the CPU and no more). Frames come out in order, and
they are the frames of the plain loop: each stage is the same computation, only its thread differs.

    with FramePipeline(wm.step_latent, wm.decode, on_frame) as pipe:
        for action in actions:
            pipe.submit(action)          # runs stage 1 here; stage 2 follows on the render thread
        pipe.flush()                     # wait for the last frame
    # on_frame(frame, tag, times) was called once per frame, in order, from the render thread

At most one advanced frame waits for the render thread (`submit` blocks while one is waiting), so
the generator never runs more than one frame ahead of the screen. `close()` (or leaving the `with`)
renders what was submitted and joins the thread; nothing outlives the pipeline.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

_STOP = object()


class FramePipeline:
    """`submit(item, tag=None)`: stage 1 (`advance(item)`) in the caller's thread, then stage 2
    (`render(advanced)`) on the render thread (or at once, `threaded=False`), whose result goes to
    `on_frame(result, tag, times)`; `times` holds the stages' wall times in seconds ("advance",
    "render"), the CPU time their threads spent on them ("advance_cpu", "render_cpu": with one
    intra-op thread, what each stage costs on a core of its own) and when the frame was submitted
    and finished ("t_submit", "t_done", perf_counter).
    An exception in stage 2 is passed to `on_frame` as the result (the caller decides what it means)."""

    def __init__(self, advance: Callable[[Any], Any], render: Callable[[Any], Any],
                 on_frame: Callable[[Any, Any, dict], None], threaded: bool = True, name: str = "worldmodel-render",
                 clock: Callable[[], float] = time.perf_counter):
        self.advance, self.render, self.on_frame, self.clock = advance, render, on_frame, clock
        self.threaded = bool(threaded)
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._idle = threading.Condition()
        self._in_flight = 0  # submitted, not yet handed to on_frame
        self._closed = False
        self.error: BaseException | None = None  # raised by on_frame on the render thread; re-raised here
        self._thread = None
        if self.threaded:
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    # -- caller side ---------------------------------------------------------------------------------
    def submit(self, item, tag=None) -> None:
        """Stage 1 now (exceptions propagate to the caller), stage 2 after it on the render thread."""
        if self._closed:
            raise RuntimeError("FramePipeline.submit after close()")
        self._raise_error()
        t0, c0 = self.clock(), time.thread_time()
        advanced = self.advance(item)
        times = {"t_submit": t0, "advance": self.clock() - t0, "advance_cpu": time.thread_time() - c0}
        self.put_rendered(advanced, tag, times, render=True)

    def put_rendered(self, value, tag=None, times: dict | None = None, render: bool = False) -> None:
        """Hand `value` to `on_frame` in order after what was submitted before it; with render=True
        stage 2 is applied to it first (what `submit` does after stage 1)."""
        times = dict(times or {"t_submit": self.clock()})
        with self._idle:
            self._in_flight += 1
        if self.threaded:
            self._queue.put((value, tag, times, render))
        else:
            self._finish(value, tag, times, render)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted frame went to `on_frame`; False if `timeout` ran out first."""
        with self._idle:
            done = self._idle.wait_for(lambda: self._in_flight == 0, timeout)
        self._raise_error()
        return done

    def _raise_error(self) -> None:
        if self.error is not None:
            e, self.error = self.error, None
            raise e

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def close(self, timeout: float = 10.0) -> None:
        """Render what was submitted, then stop and join the render thread."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._queue.put((_STOP, None, None, False))
            self._thread.join(timeout)

    def __enter__(self) -> "FramePipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- render side ---------------------------------------------------------------------------------
    def _finish(self, value, tag, times: dict, render: bool) -> None:
        t, c = self.clock(), time.thread_time()
        try:
            out = self.render(value) if render else value
        except Exception as e:  # noqa: BLE001 - handed to the caller through on_frame
            out = e
        times["render"], times["render_cpu"] = self.clock() - t, time.thread_time() - c
        times["t_done"] = self.clock()
        try:
            self.on_frame(out, tag, times)
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def _run(self) -> None:
        while True:
            value, tag, times, render = self._queue.get()
            if value is _STOP:
                return
            try:
                self._finish(value, tag, times, render)
            except BaseException as e:  # on_frame failed: the caller gets it at its next submit/flush
                self.error = e
