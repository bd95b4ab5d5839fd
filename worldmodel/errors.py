"""Errors that the CLI turns into one clear line and a non-zero exit, instead of a traceback, and the
SIGTERM handling that lets a killed command clean up like an interrupted one."""
from __future__ import annotations

import contextlib
import errno
import signal
import threading


class UserError(Exception):
    """Bad input from the user (a flag, a file, a path): the message says what and where."""


class DiskFullError(UserError):
    """No space left where a file was being written; the message names the file."""


def disk_full(path, reason: str = "No space left on device") -> DiskFullError:
    """The one line for a full disk while writing `path`; writers keep what was written before (every
    file is written atomically or appended), so the message says so."""
    return DiskFullError(f"{path}: the disk is full ({reason}); what was written before it is kept")


@contextlib.contextmanager
def writing(path):
    """Within: a full disk (ENOSPC, EDQUOT: errors that name no file) while writing `path` is a one-line
    DiskFullError naming it."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise disk_full(path, e.strerror) from None


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
