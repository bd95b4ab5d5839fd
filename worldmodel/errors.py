"""Errors that the CLI turns into one clear line and a non-zero exit, instead of a traceback, and the
SIGTERM handling that lets a killed command clean up like an interrupted one."""
from __future__ import annotations

import contextlib
import signal
import threading


class UserError(Exception):
    """Bad input from the user (a flag, a file, a path): the message says what and where."""


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def sigterm_unwinds():
    """Within: `kill PID` (SIGTERM) raises SystemExit(143), so that finally blocks run as on Ctrl-C
    (recordings finished, game engines closed, workers stopped). Only the main thread can handle
    signals; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
