"""Progress bars that read well on a terminal and in a log alike."""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 60.0  # a scheduled job's log, or `ray job logs`, gets a line a minute


class LogLines:
    """tqdm's output for a log: each redraw as a line of its own. tqdm starts a redraw with a carriage
    return and ends none with a newline, so a log kept every redraw of a run on one line, which log
    collectors (they split at newlines) hold until the run ends."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(enabled: bool, **kwargs) -> tqdm:
    """A tqdm bar on stderr. A terminal redraws it in place; in a log each redraw is a line of plain
    ASCII, so there it is redrawn once a minute (a run of 100,000 shards wrote a line per shard).
    `miniters=1` keeps that minute: with tqdm's default (dynamic) miniters, its monitor thread forced a
    redraw 10-20 s after each timed one, two lines a minute, the second with the first's rate."""
    if sys.stderr.isatty():
        return tqdm(disable=not enabled, dynamic_ncols=True, mininterval=0.1, **kwargs)
    return tqdm(
        disable=not enabled,
        file=LogLines(sys.stderr),
        ascii=True,
        mininterval=LOG_INTERVAL_S,
        miniters=1,
        **kwargs,
    )
