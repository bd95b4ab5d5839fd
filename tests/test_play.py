"""The Pygame front-end, headless (SDL dummy video driver), on CPU with a shrunken random model.

Events are injected through pygame's own queue (pygame.event.post) at chosen frames, so they go down
the same path as a player's keys and mouse."""
from __future__ import annotations

import json
import os
import time

os.environ["SDL_VIDEODRIVER"] = "dummy"
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")

import numpy as np  # noqa: E402
import pygame  # noqa: E402
import torch  # noqa: E402

from worldmodel.device import native_bf16  # noqa: E402
from worldmodel.play.app import PlayApp, Options  # noqa: E402
from worldmodel.play.keymap import COMMANDS, HELD, KEYMAP, MOUSE_BUTTONS, InputState, key_table  # noqa: E402
from worldmodel.play.sources import ClipStarts, DreamGame, RealGame, RealStarts  # noqa: E402
from worldmodel.game.action import NOOP, Action, load_actions  # noqa: E402
from worldmodel.model.autoencoder import Autoencoder  # noqa: E402
from worldmodel.inference.engine import WorldModel  # noqa: E402
from worldmodel.model.transformer import ModelConfig, WorldTransformer  # noqa: E402

PERIOD_MS = 1000.0 / 35


def small_model(steps: int = 2) -> WorldModel:
    """A shrunken random model whose output depends on the action (adaLN-Zero's zeros made small noise)."""
    cfg = ModelConfig(dim=64, depth=2, heads=2, ae_channels=(8, 8, 16, 16), window_frames=3, max_draft=2)
    torch.manual_seed(0)
    wm = WorldModel(cfg, Autoencoder(cfg.autoencoder), WorldTransformer(cfg), device="cpu", steps=steps,
                    name="test-small")
    with torch.no_grad():
        for name, p in wm.transformer.named_parameters():
            if "modulation" in name or name.startswith("final"):
                p.normal_(0, 0.2)
    return wm


def fake_clips(n: int = 4):
    rng = np.random.default_rng(0)
    return [(rng.integers(0, 255, (n, 96, 128, 3), dtype=np.uint8), [NOOP] * n)]


def dream(steps: int = 2, clips: bool = True) -> DreamGame:
    wm = small_model(steps)
    context = wm.cfg.sink_frames + wm.cfg.window_frames
    real = RealStarts("MAP01", frame_size=wm.frame_size, context=context)
    starts = ClipStarts(fake_clips(context), context=context) if clips else real
    return DreamGame(wm, starts, real_starts=real)


class Scripted(PlayApp):
    """PlayApp with events posted to pygame's queue when a frame count is reached."""

    def __init__(self, game, script: dict, **opts):
        opts.setdefault("scale", 2)
        super().__init__(game, Options(**opts))
        self.script = {k: list(v) for k, v in script.items()}

    def handle_events(self):
        n = self.meter.frames_generated if self.ready else -1
        for k in sorted(k for k in self.script if k <= n):
            for e in self.script.pop(k):
                pygame.event.post(e)
        super().handle_events()


def key(k, down=True):
    return pygame.event.Event(pygame.KEYDOWN if down else pygame.KEYUP, key=k, mod=0, unicode="", scancode=0)


def motion(dx):
    return pygame.event.Event(pygame.MOUSEMOTION, rel=(dx, 0), pos=(10, 10), buttons=(0, 0, 0))


def play(game, script, **opts):
    app = Scripted(game, script, **opts)
    try:
        report = app.run()
    finally:
        game.close()
    return app, report


# -- the keymap ------------------------------------------------------------------------------------


def test_keymap_is_one_table_and_covers_every_control():
    assert set(KEYMAP.values()) | set(MOUSE_BUTTONS.values()) == set(HELD) | set(COMMANDS)
    rows = dict((d, k) for k, d in key_table())
    assert "W" in rows["move forward"] and "Up" in rows["move forward"]
    assert "Escape" in rows["release the mouse; again: quit"]


def test_input_state_builds_actions():
    s = InputState(sensitivity=0.5)
    s.mouse_grabbed = True
    for e in (key(pygame.K_w), key(pygame.K_d), key(pygame.K_LEFT), motion(4)):
        assert s.handle(e) is None
    a = s.take_action()
    assert (a.move, a.strafe, a.turn) == (1, 1, -7.0 + 2.0)
    s.handle(motion(-100))  # clipped to the Action's range
    assert s.take_action().turn == -15.0
    s.handle(key(pygame.K_LEFT, down=False))
    s.handle(motion(100))
    assert s.take_action().turn == 15.0
    # a tap shorter than a frame still attacks once
    s.handle(pygame.event.Event(pygame.MOUSEBUTTONDOWN, button=1, pos=(0, 0)))
    s.handle(pygame.event.Event(pygame.MOUSEBUTTONUP, button=1, pos=(0, 0)))
    assert s.take_action().attack and not s.take_action().attack
    assert s.handle(key(pygame.K_ESCAPE)) == "escape" and s.handle(key(pygame.K_TAB)) == "side_by_side"
    s.release_all()
    s.handle(key(pygame.K_w, down=False))
    assert s.take_action() == NOOP


# -- the loop ---------------------------------------------------------------------------------------


class Logged(Scripted):
    """Scripted, keeping every action handed to the model (from the model thread)."""

    def _next_action(self):
        a = super()._next_action()
        self.sent = getattr(self, "sent", []) + [a]
        return a


def test_turning_left_and_right_give_different_frames():
    frames, sent = {}, {}
    for name, script in (("key_left", {0: [key(pygame.K_LEFT)]}), ("key_right", {0: [key(pygame.K_RIGHT)]}),
                         ("mouse_left", {k: [motion(-20)] for k in range(6)}),
                         ("mouse_right", {k: [motion(20)] for k in range(6)})):
        game = dream()
        app = Logged(game, script, max_frames=6, scale=2)
        try:
            report = app.run()
        finally:
            game.close()
        assert report["frames_generated"] == 6
        frames[name], sent[name] = app.frame.copy(), [a.turn for a in app.sent]
    assert sent["key_left"] == [-7.0] * 6 and sent["key_right"] == [7.0] * 6
    # mouse motion is summed over whatever happened since the last frame: 20 px * 0.25 = 5 degrees a motion
    assert all(t <= 0 for t in sent["mouse_left"]) and sum(sent["mouse_left"]) <= -5 * 4
    assert all(t >= 0 for t in sent["mouse_right"]) and sum(sent["mouse_right"]) >= 5 * 4
    assert not np.array_equal(frames["key_left"], frames["key_right"])
    assert not np.array_equal(frames["mouse_left"], frames["mouse_right"])


def test_real_game_turns_too():
    frames = []
    for k in (pygame.K_LEFT, pygame.K_RIGHT):
        app, _ = play(RealGame(RealStarts("MAP01", context=1)), {0: [key(k)]}, max_frames=5)
        frames.append(app.frame.astype(int))
    assert np.abs(frames[0] - frames[1]).mean() > 5


def test_r_records_a_playable_mp4_matching_its_actions(tmp_path):
    from worldmodel.data.recording import load_recording, paths, read_video

    app, report = play(dream(), {0: [key(pygame.K_r), key(pygame.K_w)], 5: [key(pygame.K_a)]},
                       max_frames=12, record_dir=tmp_path)
    assert len(report["recordings"]) == 1
    p = paths(report["recordings"][0])
    video, actions = read_video(p["video"]), load_actions(p["actions"])
    assert len(video) == len(actions) >= 10
    assert actions[0].move == 1 and actions[-1].strafe == -1
    frames, _, meta = load_recording(report["recordings"][0], trim=False)
    assert meta["complete"] and meta["frames"] == len(frames) == len(actions)
    assert meta["game"] == "dream" and meta["steps"] == 2


def test_plus_minus_change_steps_live_and_f12_saves_a_screenshot(tmp_path):
    game = dream(steps=2)
    app, report = play(game, {1: [key(pygame.K_EQUALS), key(pygame.K_EQUALS)], 4: [key(pygame.K_MINUS)],
                              6: [key(pygame.K_F12)], 7: [key(pygame.K_BACKSPACE)]},
                       max_frames=10, screenshot_dir=tmp_path)
    assert [s for _, s in report["steps_history"]] == [3, 4, 3]
    assert report["steps"] == 3 and game.model.steps == 3  # applied in the model thread
    assert game.starts.count == 2  # Backspace: a fresh start scene
    shot = pygame.image.load(report["screenshots"][0])
    assert shot.get_size() == (128 * 2, 96 * 2)


def test_tab_shows_the_real_game_beside_the_dream_from_the_same_start(tmp_path):
    from worldmodel.game.doom import DoomEnv

    script = [Action(turn=5.0), Action(move=1), Action(move=1, strafe=1), Action(turn=-3.0)] * 2
    game = dream(clips=True)
    context = game.real_starts.context
    app = Scripted(game, {0: [key(pygame.K_TAB)]}, max_frames=8, autoplay=script,
                   screenshot_at=[(8, tmp_path / "sbs.png")])
    try:
        report = app.run()
        assert report["side_by_side"] and report["window_size"] == [2 * 128 * 2, 96 * 2]
        assert game.scene.env is not None  # the start came from the real game
    finally:
        game.close()
    with DoomEnv(frame_size=(96, 128)) as env:  # the real game alone, fed the same start and actions
        env.reset(seed=0)
        for _ in range(context - 1):
            env.step(NOOP)
        for a in script:
            want = env.step(a)
    assert np.array_equal(app.companion, want)
    assert pygame.image.load(str(tmp_path / "sbs.png")).get_size() == (2 * 128 * 2, 96 * 2)


class SlowGame:
    """A game whose frames take 5 frame periods (sleeping releases the GIL, like torch's ops)."""
    kind, name, frame_size, fps = "dream", "slow", (96, 128), 35
    model = real_starts = scene = companion_frame = None  # no model to steer, no real game beside it
    has_companion = False

    def __init__(self, seconds):
        self.seconds = seconds

    def reset(self):
        time.sleep(self.seconds)
        return np.zeros((96, 128, 3), np.uint8)

    def step(self, action):
        time.sleep(self.seconds)
        return np.full((96, 128, 3), 128, np.uint8)

    def close(self):
        pass


def test_the_loop_never_waits_longer_than_a_frame_period_for_the_model():
    app, report = play(SlowGame(5 * PERIOD_MS / 1000), {}, max_frames=6)
    assert report["frames_generated"] == 6 and report["model_ms_p50"] >= 4 * PERIOD_MS
    assert report["max_wait_asked_ms"] <= PERIOD_MS, report  # the loop's own bound
    # what the clock saw (the OS may hand the thread back a few ms late on a busy machine)
    assert report["max_model_wait_ms"] <= PERIOD_MS * 1.5, report
    # the screen kept updating while the model worked: ~35 updates a second, not 7
    assert report["screen_updates_per_s"] > 20, report
    assert report["max_screen_gap_ms"] < 3 * PERIOD_MS, report


def test_autoplay_and_report_through_the_cli_from_a_checkpoint_with_start_clips(tmp_path, capsys):
    from worldmodel.cli import main

    ckpt = tmp_path / "ckpt"
    wm = small_model()
    wm.save_pretrained(ckpt)
    (ckpt / "start_clips").mkdir()
    frames, actions = fake_clips(6)[0]
    np.savez(ckpt / "start_clips" / "a.npz", frames=frames, actions=np.array([a.to_vector() for a in actions],
                                                                             dtype=np.float32))
    script = tmp_path / "walk.jsonl"
    script.write_text('{"move": 1, "repeat": 5}\n{"turn": -4.0, "repeat": 5}\n')
    out = tmp_path / "r.json"
    rc = main(["play", "--checkpoint", str(ckpt), "--device", "cpu", "--steps", "1",
               "--autoplay", str(script), "--max-frames", "12", "--report", str(out), "--scale", "2"])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["frames_generated"] == 12 and r["displayed_fps"] > 0 and r["steps"] == 1
    assert r["start_scene"] == "ckpt clip 0"  # no dataset, no game needed to start
    for k in ("latency_ms_p50", "latency_ms_p99", "max_wait_ms", "max_model_wait_ms", "device", "checkpoint",
              "speculative", "acceptance_rate", "speculative_stats", "target_fps"):
        assert k in r
    assert r["speculative"] == 2 and r["speculative_stats"]["frames"] == 12  # drafts on by default in play
    assert r["dtype"] == ("bfloat16" if native_bf16() else "float32")  # the precision the engine chose
    assert r["pipelined"] is (r["cpu_count"] >= 2) and r["torch_threads"] == max(1, r["cpu_count"] // 2)
    assert r["max_wait_asked_ms"] <= PERIOD_MS
    assert "displayed frames/s" in capsys.readouterr().out


def test_without_display_or_checkpoint_the_message_says_what_to_do(monkeypatch, capsys, tmp_path):
    from worldmodel.cli import main

    monkeypatch.delenv("SDL_VIDEODRIVER", raising=False)
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert main(["play", "--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "SDL_VIDEODRIVER=dummy" in err and "xvfb-run" in err

    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    monkeypatch.setattr("worldmodel.inference.loading.find_default_checkpoint", lambda: None)
    monkeypatch.chdir(tmp_path)
    assert main(["play"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "checkpoints/doom-map01-guided" in err and "--preset tiny" in err and "--real" in err


# -- the two-stage pipeline: frame t decoded while frame t+1 is generated ------------------------------------
class Captured(Scripted):
    """Keeps every generated frame the UI receives, in order."""

    def _collect(self):
        poll = self.worker.poll

        def capture():
            results = poll()
            self.got = getattr(self, "got", []) + [r.frame for r in results if r.kind == "step"]
            return results

        self.worker.poll = capture
        try:
            super()._collect()
        finally:
            self.worker.poll = poll


def _children() -> set[int]:
    out = set()
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                if d.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                    out.add(int(d))
        except (OSError, ValueError, IndexError):
            pass
    return out


def test_pipelined_play_shows_exactly_the_frames_of_the_plain_loop_and_leaves_nothing_running():
    """The same seed and actions give the same frames whether each frame is decoded on the render
    thread while the next is generated (the engine's choice on 2+ cores) or in line; when the window
    closes no thread and no process (the real game beside the dream) is left behind."""
    import threading

    script = [Action(move=1)] * 4 + [Action(turn=5.0), Action(move=1, strafe=1)] * 3 + [Action(move=1)] * 4
    threads, children = set(threading.enumerate()), _children()
    got = {}
    for pipelined in (True, False):
        game = dream()
        game.model.speculative = 2
        game.model.pipeline = pipelined
        app = Captured(game, {}, max_frames=len(script), autoplay=script, side_by_side=True)
        try:
            report = app.run()
        finally:
            game.close()
        assert report["pipelined"] is pipelined and report["frames_generated"] == len(script)
        assert set(report["profile_ms"]) >= {"generate", "decode", "draw", "flip"}
        got[pipelined] = np.stack(app.got)
        assert set(threading.enumerate()) == threads and _children() == children
    assert got[True].shape == (len(script), 96, 128, 3)
    assert np.array_equal(got[True], got[False])
