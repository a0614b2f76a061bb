"""Progress bars that read well on a terminal and in a log alike."""

from __future__ import annotations

import sys

from tqdm import tqdm

LOG_INTERVAL_S = 60.0  # a scheduled job's log, or `ray job logs`, gets a line a minute


def progress_bar(enabled: bool, **kwargs) -> tqdm:
    """A tqdm bar on stderr. A terminal redraws it in place; a log keeps every redraw as a line, so
    there it is redrawn once a minute (a run of 100,000 shards wrote a line per shard)."""
    interval = 0.1 if sys.stderr.isatty() else LOG_INTERVAL_S
    return tqdm(disable=not enabled, dynamic_ncols=True, mininterval=interval, **kwargs)
