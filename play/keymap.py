"""The keymap (ONE table) and the input state that turns keys and mouse into one `Action` per frame.

Controls come in two kinds:
- held controls shape the action of the next frame (move, strafe, turn, attack, use). A press that is
  released again before the next frame is latched, so a quick tap still reaches the game;
- commands fire once on key press (HUD, steps, recording, screenshot, restart, pause, side-by-side, Esc).

The mouse turns (relative motion while grabbed, `sensitivity` degrees of yaw per pixel), accumulated
over everything that happened since the last frame and clipped to the Action's +-15 degrees.
"""
from __future__ import annotations

import os
import threading

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import pygame  # noqa: E402

from worldmodel.game.action import TURN_MAX, Action  # noqa: E402

KEY_TURN_DEGREES = 7.0  # arrow keys: Doom's running keyboard turn speed (angleturn 1280 = 7.03 deg a tic)
DEFAULT_SENSITIVITY = 0.25  # mouse: degrees of yaw per pixel of relative motion

HELD = ("forward", "back", "strafe_left", "strafe_right", "turn_left", "turn_right", "attack", "use")
COMMANDS = ("escape", "hud", "steps_up", "steps_down", "record", "screenshot", "restart", "pause",
            "side_by_side")

# key -> control. Every binding of the front-end is here and nowhere else.
KEYMAP: dict[int, str] = {
    pygame.K_w: "forward", pygame.K_UP: "forward",
    pygame.K_s: "back", pygame.K_DOWN: "back",
    pygame.K_a: "strafe_left",
    pygame.K_d: "strafe_right",
    pygame.K_LEFT: "turn_left",
    pygame.K_RIGHT: "turn_right",
    pygame.K_LCTRL: "attack", pygame.K_RCTRL: "attack",
    pygame.K_SPACE: "use", pygame.K_e: "use",
    pygame.K_ESCAPE: "escape",
    pygame.K_h: "hud",
    pygame.K_EQUALS: "steps_up", pygame.K_PLUS: "steps_up", pygame.K_KP_PLUS: "steps_up",
    pygame.K_MINUS: "steps_down", pygame.K_KP_MINUS: "steps_down",
    pygame.K_r: "record",
    pygame.K_F12: "screenshot",
    pygame.K_BACKSPACE: "restart",
    pygame.K_p: "pause",
    pygame.K_TAB: "side_by_side",
}
# mouse button -> control (1 = left)
MOUSE_BUTTONS: dict[int, str] = {1: "attack"}

DESCRIPTIONS = {
    "forward": "move forward", "back": "move back", "strafe_left": "strafe left", "strafe_right": "strafe right",
    "turn_left": "turn left", "turn_right": "turn right", "attack": "attack", "use": "use (doors, switches)",
    "escape": "release the mouse; again: quit", "hud": "toggle the HUD", "steps_up": "more denoising steps",
    "steps_down": "fewer denoising steps", "record": "start/stop recording (MP4 + actions)",
    "screenshot": "screenshot (PNG)", "restart": "restart from a fresh start scene", "pause": "pause",
    "side_by_side": "show the real game beside the dream",
}

assert set(KEYMAP.values()) | set(MOUSE_BUTTONS.values()) <= set(HELD) | set(COMMANDS)


def key_table() -> list[tuple[str, str]]:
    """(keys, what they do) rows, in the order of HELD then COMMANDS, for --help and the README."""
    names = {"left ctrl": "Ctrl", "right ctrl": "", "=": "+", "[+]": "", "[-]": "", "f12": "F12"}
    rows = []
    for control in HELD + COMMANDS:
        keys: list[str] = []
        for k, c in KEYMAP.items():
            if c == control:
                n = pygame.key.name(k)  # needs no display
                n = names.get(n, n.upper() if len(n) == 1 else n.title())
                if n and n not in keys:
                    keys.append(n)
        keys += [f"mouse button {b}" if b != 1 else "left click" for b, c in MOUSE_BUTTONS.items() if c == control]
        if control in ("turn_left", "turn_right"):
            keys.append("mouse " + control[5:])
        rows.append((" / ".join(keys), DESCRIPTIONS[control]))
    return rows


class InputState:
    """Keys held, taps latched and mouse motion accumulated since the last frame's action."""

    def __init__(self, sensitivity: float = DEFAULT_SENSITIVITY, key_turn: float = KEY_TURN_DEGREES):
        self.sensitivity = float(sensitivity)
        self.key_turn = float(key_turn)
        self.mouse_grabbed = False  # relative mouse turning is on
        self._keys_down: set[int] = set()  # keyboard keys and ("mouse", button) currently down
        self._latched: set[str] = set()  # held controls pressed since the last action
        self._mouse_dx = 0.0  # pixels since the last action
        self._lock = threading.Lock()  # the UI thread feeds events, the model thread takes actions

    # -- events ------------------------------------------------------------------------------------
    def handle(self, event) -> str | None:
        """Feed one pygame event; returns the command it fires (a name from COMMANDS) or None."""
        with self._lock:
            return self._handle(event)

    def _handle(self, event) -> str | None:
        t = event.type
        if t == pygame.KEYDOWN:
            control = KEYMAP.get(event.key)
            if control in COMMANDS:
                return control
            if control is not None:
                self._keys_down.add(event.key)
                self._latched.add(control)
        elif t == pygame.KEYUP:
            self._keys_down.discard(event.key)
        elif t == pygame.MOUSEBUTTONDOWN:
            control = MOUSE_BUTTONS.get(event.button)
            if control is not None and self.mouse_grabbed:
                self._keys_down.add(("mouse", event.button))
                self._latched.add(control)
        elif t == pygame.MOUSEBUTTONUP:
            self._keys_down.discard(("mouse", event.button))
        elif t == pygame.MOUSEMOTION:
            if self.mouse_grabbed:
                self._mouse_dx += float(event.rel[0])
        elif t == pygame.WINDOWFOCUSLOST:
            self._release_all()
        return None

    def release_all(self) -> None:
        """Forget every key held (focus lost, mouse released): nothing keeps running on its own."""
        with self._lock:
            self._release_all()

    def _release_all(self) -> None:
        self._keys_down.clear()
        self._latched.clear()
        self._mouse_dx = 0.0

    def held(self, control: str) -> bool:
        for k in self._keys_down:
            c = MOUSE_BUTTONS.get(k[1]) if isinstance(k, tuple) else KEYMAP.get(k)
            if c == control:
                return True
        return False

    # -- the action --------------------------------------------------------------------------------
    def peek_action(self) -> Action:
        on = {c for c in HELD if self.held(c)} | self._latched
        move = ("forward" in on) - ("back" in on)
        strafe = ("strafe_right" in on) - ("strafe_left" in on)
        turn = self._mouse_dx * self.sensitivity + self.key_turn * (("turn_right" in on) - ("turn_left" in on))
        turn = max(-TURN_MAX, min(TURN_MAX, turn))
        return Action(move=move, strafe=strafe, turn=turn, attack="attack" in on, use="use" in on)

    def take_action(self) -> Action:
        """The action for the next frame; clears the latches and the mouse motion it used."""
        with self._lock:
            a = self.peek_action()
            self._latched.clear()
            self._mouse_dx = 0.0
        return a
