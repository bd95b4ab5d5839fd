"""The one progress bar every long-running command uses: tqdm on stderr, redrawn live on a terminal;
into a log file or a pipe (a training run under nohup, CI) at most every 30 s, so logs stay readable."""
from __future__ import annotations

import sys

LOG_INTERVAL_S = 30.0  # seconds between updates when stderr is not a terminal


def progress_bar(iterable=None, **kwargs):
    """tqdm(iterable, **kwargs) on stderr; `disable`, `desc`, `total`, `unit`... as tqdm's."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.1 if tty else LOG_INTERVAL_S)
    if not tty:  # tqdm's monitor thread would otherwise force a redraw every 10 s
        kwargs.setdefault("maxinterval", LOG_INTERVAL_S)
    return tqdm(iterable, **kwargs)
