"""The HUD: what the game loop measures (`Meter`) and how it is drawn over the frame (`Hud`)."""
from __future__ import annotations

import collections
import os

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import numpy as np  # noqa: E402
import pygame  # noqa: E402


def percentile(values, q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


class Meter:
    """Frame timings of the game loop. Times are seconds from the loop's clock."""

    def __init__(self, period: float, window_s: float = 1.0):
        self.period = period
        self.window_s = window_s
        self.shown = collections.deque()  # display times of new generated frames, last window_s
        self.first_shown: float | None = None
        self.last_shown: float | None = None
        self.frames_displayed = 0
        self.frames_generated = 0
        self.flips = 0
        self.first_flip: float | None = None
        self.last_flip: float | None = None
        self.latency: list[float] = []  # action submitted -> its frame on screen
        self.compute: list[float] = []  # time the model spent on the frame
        self.max_wait = 0.0  # longest single wait of the loop (for the model, or for the next tick)
        self.max_wait_asked = 0.0  # the longest the loop asked to wait (its own bound, before OS delays)
        self.max_model_wait = 0.0  # longest single wait while a frame was being generated
        self.max_gap = 0.0  # longest time between two screen updates
        self.max_iteration = 0.0  # longest loop iteration, waits excluded (events, drawing, recording)
        self.stages: dict[str, list[float]] = collections.defaultdict(list)  # seconds a frame, per stage

    def stage(self, name: str, seconds: float) -> None:
        """Time one frame spent in a stage: generate (transformer, model thread), decode (decoder and
        colour conversion, render thread), draw (frame to screen surface, scaling, HUD: UI thread), flip."""
        self.stages[name].append(seconds)

    def generated(self, compute_s: float) -> None:
        self.frames_generated += 1
        self.compute.append(compute_s)

    def flip(self, now: float, new_frame_submitted_at: float | None) -> None:
        if self.last_flip is not None:
            self.max_gap = max(self.max_gap, now - self.last_flip)
        else:
            self.first_flip = now
        self.last_flip = now
        self.flips += 1
        if new_frame_submitted_at is not None:
            self.frames_displayed += 1
            self.shown.append(now)
            if self.first_shown is None:
                self.first_shown = now
            self.last_shown = now
            self.latency.append(now - new_frame_submitted_at)
        while self.shown and now - self.shown[0] > self.window_s:
            self.shown.popleft()

    def waited(self, seconds: float, model_busy: bool, asked: float = 0.0) -> None:
        self.max_wait = max(self.max_wait, seconds)
        self.max_wait_asked = max(self.max_wait_asked, asked)
        if model_busy:
            self.max_model_wait = max(self.max_model_wait, seconds)

    def restart_fps(self) -> None:
        """Forget the displayed-frame times (after a restart or a pause: the rate starts again)."""
        self.shown.clear()

    def fps_now(self, now: float) -> float:
        """Generated frames displayed per second over the last `window_s`."""
        while self.shown and now - self.shown[0] > self.window_s:
            self.shown.popleft()
        if len(self.shown) < 2:
            return 0.0
        span = max(now - self.shown[0], self.shown[-1] - self.shown[0])
        return (len(self.shown) - 1) / span if span > 0 else 0.0

    def summary(self) -> dict:
        ms = lambda v: None if v is None else round(v * 1000.0, 2)  # noqa: E731
        run_fps = None
        if self.first_shown is not None and self.last_shown is not None and self.last_shown > self.first_shown:
            run_fps = (self.frames_displayed - 1) / (self.last_shown - self.first_shown)
        loop_fps = None
        if self.first_flip is not None and self.last_flip is not None and self.last_flip > self.first_flip:
            loop_fps = (self.flips - 1) / (self.last_flip - self.first_flip)
        return {
            "displayed_fps": None if run_fps is None else round(run_fps, 2),
            "target_fps": round(1.0 / self.period, 2),
            "screen_updates_per_s": None if loop_fps is None else round(loop_fps, 2),
            "frames_generated": self.frames_generated,
            "frames_displayed": self.frames_displayed,
            "latency_ms_p50": ms(percentile(self.latency, 50)),
            "latency_ms_p99": ms(percentile(self.latency, 99)),
            "latency_ms_max": ms(max(self.latency) if self.latency else None),
            "model_ms_p50": ms(percentile(self.compute, 50)),
            "model_ms_p99": ms(percentile(self.compute, 99)),
            "model_ms_mean": ms(float(np.mean(self.compute)) if self.compute else None),
            "frame_period_ms": ms(self.period),
            "max_wait_ms": ms(self.max_wait),
            "max_model_wait_ms": ms(self.max_model_wait),
            "max_wait_asked_ms": ms(self.max_wait_asked),
            "max_screen_gap_ms": ms(self.max_gap),
            "max_loop_iteration_ms": ms(self.max_iteration),
            "profile_ms": {k: {"p50": ms(percentile(v, 50)), "mean": ms(float(np.mean(v))), "p99": ms(percentile(v, 99))}
                           for k, v in self.stages.items() if v},
        }


class Hud:
    """Text over the frame: the stats block (top left), a one-line message (top centre, fades) and the
    key help (bottom). Text surfaces are rendered only when their text changes."""

    def __init__(self, font_px: int = 18):
        self.font = pygame.font.Font(None, font_px)
        self.big = pygame.font.Font(None, font_px * 3)
        self._cache: dict[tuple, pygame.Surface] = {}

    def _text(self, text: str, color=(255, 255, 255), big: bool = False) -> pygame.Surface:
        key = (text, color, big)
        s = self._cache.get(key)
        if s is None:
            if len(self._cache) > 256:
                self._cache.clear()
            s = (self.big if big else self.font).render(text, True, color)
            self._cache[key] = s
        return s

    def _panel(self, surface: pygame.Surface, lines: list[tuple[str, tuple]], x: int, y: int,
               align: str = "left") -> None:
        if not lines:
            return
        rendered = [self._text(t, c) for t, c in lines]
        pad = 4
        w = max(r.get_width() for r in rendered) + 2 * pad
        h = sum(r.get_height() for r in rendered) + 2 * pad
        if align == "center":
            x -= w // 2
        elif align == "right":
            x -= w
        if y < 0:
            y = surface.get_height() + y - h
        bg = pygame.Surface((w, h), pygame.SRCALPHA)
        bg.fill((0, 0, 0, 150))
        surface.blit(bg, (x, y))
        yy = y + pad
        for r in rendered:
            surface.blit(r, (x + pad, yy))
            yy += r.get_height()

    def draw_stats(self, surface, lines: list[tuple[str, tuple]]) -> None:
        self._panel(surface, lines, 6, 6)

    def draw_message(self, surface, text: str) -> None:
        self._panel(surface, [(text, (255, 230, 120))], surface.get_width() // 2, 6, align="center")

    def draw_help(self, surface, items: list[str]) -> None:
        """The items, packed into as few lines as fit the width."""
        width = surface.get_width() - 20
        key = ("help", tuple(items), width)
        lines = self._cache.get(key)
        if lines is None:
            lines, cur = [], ""
            for it in items:
                cand = f"{cur}   {it}" if cur else it
                if cur and self.font.size(cand)[0] > width:
                    lines.append(cur)
                    cand = it
                cur = cand
            lines.append(cur)
            self._cache[key] = lines
        self._panel(surface, [(t, (200, 200, 200)) for t in lines], 6, -6)

    def draw_label(self, surface, text: str, x: int, y: int) -> None:
        self._panel(surface, [(text, (255, 255, 255))], x, y, align="center")

    def draw_banner(self, surface, text: str, rect: pygame.Rect) -> None:
        s = self._text(text, (255, 255, 255), big=True)
        bg = pygame.Surface((s.get_width() + 24, s.get_height() + 12), pygame.SRCALPHA)
        bg.fill((0, 0, 0, 170))
        r = bg.get_rect(center=rect.center)
        surface.blit(bg, r)
        surface.blit(s, s.get_rect(center=rect.center))
