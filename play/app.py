"""The play loop and its window (the `worldmodel play` command: play/command.py).

One loop (`PlayApp`) drives anything with `reset()`/`step(action)` (play/sources.py): the dream (the
world model), the real game, or a recording. Two threads:

- the UI thread (`PlayApp._loop`) owns the window. It reads events every iteration into `InputState`
  (play/keymap.py: keys held, taps latched, mouse motion summed), runs the commands (HUD, steps,
  recording, screenshot, restart, pause, side by side), shows the latest finished frame scaled up and
  draws the HUD, at least at the game's frame rate (35 Hz) and as soon as a frame is ready. It never
  waits for the model: it sleeps on the worker's "frame ready" event with a timeout that ends before
  the next screen update is due (less than one frame period).
- the model thread (`FrameWorker`, play/worker.py) runs `reset()`/`step()` at most once per tic: when
  the previous frame is done and the next tic is due, it takes the action for the next frame from
  `PlayApp._next_action` (the input summed since the last frame, or the autoplay script's next action:
  the same point of the same loop) and generates the frame. torch releases the GIL inside its ops.

`--report FILE` writes what the HUD shows (and the loop's timings) as JSON when the loop ends.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import numpy as np  # noqa: E402
import pygame  # noqa: E402

from worldmodel.play.hud import Hud, Meter  # noqa: E402
from worldmodel.play.keymap import DEFAULT_SENSITIVITY, InputState  # noqa: E402
from worldmodel.play.worker import FrameWorker  # noqa: E402
from worldmodel.game.action import Action, ActionScript  # noqa: E402
from worldmodel.errors import UserError  # noqa: E402

WAKE_MARGIN = 0.003  # seconds: the loop's waits end this much before the next update or tic is due
GIL_SWITCH_INTERVAL = 0.001  # seconds (Python's default 0.005): the UI thread gets the GIL back sooner
NO_DISPLAY = ("no display to open a window on: run headless with `SDL_VIDEODRIVER=dummy worldmodel play "
              "--autoplay SCRIPT --max-frames N --report FILE.json`, or on a virtual display with "
              "`xvfb-run -s \"-screen 0 1280x800x24\" worldmodel play`")
HELP = ["W/S or Up/Down move", "A/D strafe", "mouse or Left/Right turn", "click/Ctrl fire", "Space/E use",
        "+/- steps", "R record", "F12 screenshot", "Tab real game", "P pause", "Backspace restart", "H HUD",
        "Esc free mouse (twice: quit)"]


@dataclass
class Options:
    scale: int | None = None  # None: the largest integer scale that fits the screen
    fullscreen: bool = False
    sensitivity: float = DEFAULT_SENSITIVITY
    autoplay: ActionScript | list[Action] | None = None  # read again from its start when it ends
    max_frames: int | None = None
    report: Path | None = None
    record_dir: Path = Path("recordings")
    screenshot_dir: Path = Path("screenshots")
    screenshot_at: list[tuple[int, Path]] = field(default_factory=list)
    side_by_side: bool = False
    hud: bool = True
    grab_mouse: bool = True
    checkpoint: str = ""
    extra_meta: dict = field(default_factory=dict)


def check_display() -> None:
    """A one-line UserError when there is no display and no SDL driver was chosen."""
    if os.environ.get("SDL_VIDEODRIVER"):
        return
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise UserError(NO_DISPLAY)


def frame_surface(frame: np.ndarray) -> pygame.Surface:
    frame = np.ascontiguousarray(frame, dtype=np.uint8)
    h, w = frame.shape[:2]
    return pygame.image.frombuffer(frame.tobytes(), (w, h), "RGB")


class PlayApp:
    """The game loop and its state. `run()` returns the report (a dict) when the loop ends."""

    def __init__(self, game, options: Options | None = None, clock=time.perf_counter):
        self.game = game
        self.opt = options or Options()
        self.clock = clock
        self.fps = int(game.fps)
        self.period = 1.0 / self.fps
        self.frame_size = tuple(game.frame_size)  # (H, W)
        self.input = InputState(self.opt.sensitivity)
        self.meter = Meter(self.period)
        self.model = game.model  # the WorldModel of the dream, else None
        # state
        self.running = True
        self.paused = False
        self.show_hud = self.opt.hud
        self.side_by_side = bool(self.opt.side_by_side) and game.kind == "dream"
        if self.side_by_side:
            game.follow_real = True  # start from the real game so that it can run beside the dream
        self.ready = False  # a start scene is loaded
        self.frame: np.ndarray | None = None
        self.companion: np.ndarray | None = None
        self._frame_surf: pygame.Surface | None = None
        self._companion_surf: pygame.Surface | None = None
        self._new_frame_at: float | None = None  # when the input of a frame not yet on screen was taken
        self.recorder = None
        self.recording_path: str | None = None
        self.recordings: list[str] = []
        self._closing: list[threading.Thread] = []
        self.screenshots: list[str] = []
        self._screenshot_at = sorted(self.opt.screenshot_at, key=lambda t: t[0])
        self.autoplay_actions = iter(self.opt.autoplay) if self.opt.autoplay is not None else None
        self.last_action: Action | None = None
        self.message = ""
        self._message_until = 0.0
        self._stats: dict = {}
        self._hud_lines: list = []
        self._hud_at = -1.0
        self.steps_history: list[tuple[int, int]] = []  # (frame, steps) each time steps changed
        self.worker: FrameWorker | None = None
        self.screen: pygame.Surface | None = None
        self.scale = 1
        self.window_size = (0, 0)
        self.ui_cpu_s = 0.0
        self._cpu_start = 0.0
        self._t_start = 0.0
        self.started_at = time.strftime("%Y-%m-%dT%H:%M:%S")

    @property
    def steps(self) -> int | None:
        """The model's denoising steps as its next frame runs them (a change asked for included); None
        without a model."""
        settings = self.worker.settings if self.worker is not None else self.model and self.model.settings
        return settings.steps if settings is not None else None

    # -- window ------------------------------------------------------------------------------------
    def _auto_scale(self, panes: int) -> int:
        if self.opt.scale:
            return max(1, int(self.opt.scale))
        h, w = self.frame_size
        try:
            dw, dh = pygame.display.get_desktop_sizes()[0]
        except (pygame.error, IndexError):
            dw, dh = 1024, 768
        return max(1, min(8, int(dw * 0.95) // (w * panes), int(dh * 0.85) // h))

    def _open_window(self) -> None:
        panes = 2 if self.side_by_side else 1
        self.scale = self._auto_scale(panes)
        h, w = self.frame_size
        size = (w * self.scale * panes, h * self.scale)
        flags = (pygame.FULLSCREEN | pygame.SCALED) if self.opt.fullscreen else 0
        try:
            self.screen = pygame.display.set_mode(size, flags)
        except pygame.error as e:
            raise UserError(f"{NO_DISPLAY} ({e})") from None
        self.window_size = self.screen.get_size()
        pygame.display.set_caption(f"worldmodel - {self.game.name}")
        self.hud = Hud(font_px=max(16, min(24, 3 * self.scale + 4)))
        self._frame_surf = self._companion_surf = None  # rescale at the new size

    def _grab(self, on: bool) -> None:
        self.input.mouse_grabbed = on
        self.input.release_all()
        try:
            pygame.event.set_grab(on)
            pygame.mouse.set_visible(not on)
            if hasattr(pygame.mouse, "set_relative_mode"):
                pygame.mouse.set_relative_mode(on)
        except pygame.error:
            pass

    # -- messages ------------------------------------------------------------------------------------
    def say(self, text: str, seconds: float = 2.5) -> None:
        self.message = text
        self._message_until = self.clock() + seconds

    # -- commands ------------------------------------------------------------------------------------
    def command(self, name: str) -> None:
        getattr(self, f"cmd_{name}")()

    def cmd_escape(self) -> None:
        if self.input.mouse_grabbed:
            self._grab(False)
            self.say("mouse released: click to play, Esc again to quit")
        else:
            self.running = False

    def cmd_hud(self) -> None:
        self.show_hud = not self.show_hud

    def _change_steps(self, delta: int) -> None:
        if self.steps is None:
            self.say(f"{self.game.kind}: no denoising steps to change")
            return
        new = self.steps + delta
        try:
            self.worker.configure(steps=new)  # checked now (the engine's settings), applied before the next frame
        except ValueError:  # fewer than 1: unchanged
            pass
        else:
            self.steps_history.append((self.meter.frames_generated, new))
            if self.recorder is not None:
                self.recorder.update_meta(steps_changes=[list(h) for h in self.steps_history])
        self.say(f"denoising steps: {self.steps}")

    def cmd_steps_up(self) -> None:
        self._change_steps(+1)

    def cmd_steps_down(self) -> None:
        self._change_steps(-1)

    def cmd_pause(self) -> None:
        self.paused = not self.paused
        self.worker.pause(self.paused)
        self.meter.restart_fps()
        self.say("paused" if self.paused else "")

    def _restart(self, message: str) -> None:
        self.ready = False
        self.input.release_all()
        self.worker.request_reset()
        self.say(message, seconds=4.0)

    def cmd_restart(self) -> None:
        self._restart("restarting from a fresh start scene...")

    def cmd_side_by_side(self) -> None:
        if self.game.kind != "dream":
            self.say(f"side by side compares the dream with the real game; this is the {self.game.kind}")
            return
        self.side_by_side = not self.side_by_side
        if self.side_by_side and not self.game.has_companion:
            self.game.follow_real = True
            self._restart("restarting dream and real game from the same start...")
        self._open_window()

    def cmd_screenshot(self, path: Path | None = None) -> None:
        if path is None:
            path = self.opt.screenshot_dir / f"play-{time.strftime('%Y%m%d-%H%M%S')}-{self.meter.frames_generated}.png"
        path = Path(path)
        try:  # a place that cannot be written ends the screenshot, not the session
            path.parent.mkdir(parents=True, exist_ok=True)
            pygame.image.save(self.screen, str(path))
        except (OSError, pygame.error) as e:
            self.say(f"screenshot failed: {path}: {e}")
            return
        self.screenshots.append(str(path))
        self.say(f"screenshot: {path}")

    def cmd_record(self) -> None:
        if self.recorder is not None:
            self._stop_recording()
        else:
            self._start_recording()

    def _start_recording(self) -> None:
        from worldmodel.data.recording import Recorder, new_prefix

        prefix = new_prefix(self.opt.record_dir, "play")
        try:  # a place that cannot be written ends the recording, not the session
            self.recorder = Recorder(str(prefix), self.fps, self.frame_size, self._meta())
        except OSError as e:
            self.say(f"cannot record to {prefix}: {e}")
            return
        self.recording_path = str(prefix)
        self.recordings.append(str(prefix))
        self.say(f"recording to {prefix}.mp4")

    def _stop_recording(self, wait: bool = False) -> None:
        """Close the recording; ffmpeg finishes the file in a thread so the loop does not wait for it."""
        if self.recorder is None:
            return
        rec, self.recorder = self.recorder, None
        t = threading.Thread(target=rec.close, name="recording-close", daemon=False)
        t.start()
        self._closing.append(t)
        if wait:
            for t in self._closing:
                t.join()
        self.say(f"recording saved: {self.recording_path}.mp4 (+ .actions.jsonl)")

    def _meta(self) -> dict:
        m = self.model
        meta = {}
        if m is not None:
            from worldmodel.data.recording import model_meta

            meta.update(model_meta(m))
        meta.update({"source": "worldmodel play", "game": self.game.kind, "name": self.game.name,
                     "checkpoint": self.opt.checkpoint or self.game.name, "fps": self.fps,
                     "frame_size": list(self.frame_size)})
        if m is not None:
            meta["steps"] = self.steps
        if self.game.scene is not None:
            meta["start_scene"] = self.game.scene.label
        meta.update(self.opt.extra_meta)
        return meta

    # -- events --------------------------------------------------------------------------------------
    def handle_events(self) -> None:
        for event in pygame.event.get():
            if event.type == pygame.QUIT:
                self.running = False
            elif (event.type == pygame.MOUSEBUTTONDOWN and not self.input.mouse_grabbed
                  and self.opt.grab_mouse and self.opt.autoplay is None):
                self._grab(True)  # a click into the window takes the mouse back; it does not fire
                self.say("")
                continue
            cmd = self.input.handle(event)
            if cmd is not None:
                self.command(cmd)

    # -- the model thread ------------------------------------------------------------------------------
    def _next_action(self) -> Action | None:
        """The action for the next frame: the keys and mouse since the last frame, or the script's next.
        Called by the model thread when it starts a frame."""
        if self.opt.autoplay is not None:
            self.input.take_action()  # keys still work as commands; their motion is dropped
            a = next(self.autoplay_actions, None)
            if a is None:  # the script's end: again from its start until --max-frames, else stop
                if self.opt.max_frames is None:
                    return None
                self.autoplay_actions = iter(self.opt.autoplay)
                a = next(self.autoplay_actions)
            return a
        return self.input.take_action()

    def _collect(self) -> None:
        for r in self.worker.poll():
            if r.error is not None:
                raise r.error
            if r.kind == "end":
                self.running = False
                continue
            if "stats" in r.info:
                self._stats = r.info["stats"]
            self.frame = r.frame
            self.companion = r.companion
            self._frame_surf = self._companion_surf = None
            if r.kind == "reset":
                self.ready = True
                self.meter.restart_fps()
                self.say("")
                if self.recorder is not None:  # a restart is a cut: the recording goes on in a new file
                    self._stop_recording()
                    self._start_recording()
                continue
            self.meter.generated(r.compute_s)
            for stage, key in (("generate", "advance"), ("decode", "render")):
                if key in r.info.get("times", {}):
                    self.meter.stage(stage, r.info["times"][key])
            self.last_action = r.action
            self._new_frame_at = r.t_action
            if self.recorder is not None:
                self.recorder.add(r.frame, r.action, latency_ms=1000.0 * r.compute_s)

    # -- drawing ---------------------------------------------------------------------------------------
    def _scaled(self, frame: np.ndarray) -> pygame.Surface:
        h, w = frame.shape[:2]
        return pygame.transform.scale(frame_surface(frame), (w * self.scale, h * self.scale))

    def _update_hud_lines(self, now: float) -> None:
        if now - self._hud_at < 0.25 and self._hud_lines:
            return
        self._hud_at = now
        white, grey, red = (255, 255, 255), (190, 190, 190), (255, 90, 90)
        s = self.summary(now)
        lat = s["latency_ms_p50"]
        lines = [(f"{s['checkpoint']}  [{self.game.kind}]  {s['device']}" + (f" {s['dtype']}" if s["dtype"] else ""),
                  grey),
                 (f"FPS {s['hud_fps']:.1f}  (target {self.fps})", white),
                 ("latency " + ("-" if lat is None else f"{lat:.0f} ms p50 / {s['latency_ms_p99']:.0f} ms p99"),
                  white)]
        if self.steps is not None:
            acc = s.get("acceptance_rate")
            lines.append((f"steps {self.steps}   speculative {s['speculative']}"
                          + ("" if acc is None else f"  accepted {100 * acc:.0f}%"), white))
        lines.append((f"frame {s['frames_generated']}", grey))
        if self.recorder is not None:
            lines.append((f"REC {self.recording_path}", red))
        self._hud_lines = lines

    def draw(self, now: float) -> None:
        scr = self.screen
        scr.fill((0, 0, 0))
        h, w = self.frame_size
        pane = pygame.Rect(0, 0, w * self.scale, h * self.scale)
        if self.frame is not None:
            if self._frame_surf is None:
                self._frame_surf = self._scaled(self.frame)
            scr.blit(self._frame_surf, pane)
        if self.side_by_side:
            right = pane.move(pane.width, 0)
            if self.companion is not None:
                if self._companion_surf is None:
                    self._companion_surf = self._scaled(self.companion)
                scr.blit(self._companion_surf, right)
            else:
                self.hud.draw_label(scr, "real game: starting...", right.centerx, right.centery)
            self.hud.draw_label(scr, "dream (generated)", pane.centerx, pane.bottom - 30)
            self.hud.draw_label(scr, "real game (same actions)", right.centerx, right.bottom - 30)
        if not self.ready:
            self.hud.draw_banner(scr, "loading start scene...", pane)
        elif self.paused:
            self.hud.draw_banner(scr, "PAUSED", pane)
        if self.show_hud:
            self._update_hud_lines(now)
            self.hud.draw_stats(scr, self._hud_lines)
            if not self.side_by_side:
                self.hud.draw_help(scr, HELP)
        if self.message and now < self._message_until:
            self.hud.draw_message(scr, self.message)
        elif not self.input.mouse_grabbed and self.opt.grab_mouse and self.opt.autoplay is None and self.ready:
            self.hud.draw_message(scr, "click to play - Esc quits")

    # -- the loop --------------------------------------------------------------------------------------
    def run(self) -> dict:
        pygame.display.init()
        pygame.font.init()
        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, GIL_SWITCH_INTERVAL))
        try:
            self._open_window()
            self._load_first_scene()
            self.worker = FrameWorker(self.game, self._next_action, fps=self.fps, max_frames=self.opt.max_frames,
                                      clock=self.clock)
            if self.opt.grab_mouse and self.opt.autoplay is None:
                self._grab(True)
            self._loop()
        finally:
            try:
                self._stop_recording(wait=True)
            finally:
                if self.worker is not None:
                    self.worker.close()
                pygame.display.quit()
                sys.setswitchinterval(switch)
        report = self.summary(self.clock(), final=True)
        report["window_size"] = list(self.window_size)
        if self.opt.report is not None:
            self.opt.report.parent.mkdir(parents=True, exist_ok=True)
            self.opt.report.write_text(json.dumps(report, indent=2) + "\n")
        return report

    def _load_first_scene(self) -> None:
        """The first start scene is loaded before the loop starts, with a banner on screen: starting the
        real game (ViZDoom) holds the GIL for a moment, which must not count as the loop freezing.
        Later restarts run in the model thread."""
        self.draw(self.clock())
        pygame.display.flip()
        pygame.event.pump()
        if self.game.real_starts is not None:
            self.game.real_starts._env()  # for the side-by-side view (Tab), ready in advance
        self.frame = self.game.reset()
        self.companion = self.game.companion_frame
        self.ready = True

    def _loop(self) -> None:
        clock, period, worker = self.clock, self.period, self.worker
        self._t_start = clock()
        self._cpu_start = time.thread_time()
        next_flip = self._t_start
        while self.running:
            t_iter = clock()
            self._collect()
            self.handle_events()
            worker.start()  # (once) after the first events: the first frame already sees them
            now = clock()
            new = self._new_frame_at
            if new is not None or now >= next_flip - WAKE_MARGIN or not self.running:
                t_draw = now
                self.draw(now)
                t_flip = clock()
                pygame.display.flip()
                now = clock()
                if new is not None:  # a new frame's trip to the screen (not the HUD-only refreshes)
                    self.meter.stage("draw", t_flip - t_draw)
                    self.meter.stage("flip", now - t_flip)
                self.meter.flip(now, new)
                self._new_frame_at = None
                next_flip = now + period
                self._screenshots_due()
            self.meter.max_iteration = max(self.meter.max_iteration, clock() - t_iter)
            if not self.running:
                break
            # sleep until the next screen update is due or a frame is ready, never longer than a period;
            # wake a little early: the OS and the GIL (held by the model thread between torch ops) can
            # hand the thread back a few ms late, and the loop must be running again within one period
            timeout = min(period - WAKE_MARGIN, max(0.0005, next_flip - clock() - WAKE_MARGIN))
            busy = worker.busy
            t0 = clock()
            worker.wait(timeout)
            self.meter.waited(clock() - t0, busy, timeout)
        self.ui_cpu_s = time.thread_time() - self._cpu_start

    def _screenshots_due(self) -> None:
        while self._screenshot_at and self.meter.frames_generated >= self._screenshot_at[0][0]:
            _, path = self._screenshot_at.pop(0)
            self.cmd_screenshot(path)

    # -- the report ----------------------------------------------------------------------------------
    def summary(self, now: float, final: bool = False) -> dict:
        m = self.model
        stats = dict(self._stats)
        s = {"checkpoint": self.opt.checkpoint or self.game.name, "game": self.game.kind,
             "device": str(m.device) if m is not None else "cpu",
             "dtype": str(m.dtype).removeprefix("torch.") if m is not None else None,
             "hud_fps": round(self.meter.fps_now(now), 2),
             "steps": self.steps, "speculative": m.speculative if m is not None else None,
             "pipelined": self.worker.pipelined if self.worker is not None else None,
             "acceptance_rate": stats.get("acceptance_rate"), "speculative_stats": stats or None}
        s.update(self.meter.summary())
        if final:
            s.update(frame_size=list(self.frame_size), scale=self.scale, side_by_side=self.side_by_side,
                     autoplay=self.opt.autoplay is not None, max_frames=self.opt.max_frames,
                     wall_s=round(now - self._t_start, 3),
                     ui_thread_cpu_fraction=round(self.ui_cpu_s / max(1e-9, now - self._t_start), 4),
                     load_average=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
                     cpu_count=os.cpu_count(), steps_history=self.steps_history,
                     recordings=self.recordings, screenshots=self.screenshots,
                     start_scene=self.game.scene.label if self.game.scene is not None else None,
                     attention=m.attention if m is not None else None,
                     torch_threads=_torch_threads(),
                     started_at=self.started_at)
        return s


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()
