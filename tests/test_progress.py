"""Progress bars in a log (stderr not a terminal): a line a minute, as docs/cluster.md says."""

from __future__ import annotations

import re
import time

import pytest
import tqdm
import tqdm._monitor
import tqdm.std

from sanitizer.progress import progress_bar


class FakeClock:
    """The time tqdm and its monitor thread read, moved by the test."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch):
    """A fake clock, and tqdm's monitor thread started afresh on it, checking every 10 ms of real time
    (it checks every 10 s), so that it looks at the bar at each simulated second the test sleeps in."""
    fake = FakeClock()
    monkeypatch.setattr(tqdm.std, "time", fake)
    monkeypatch.setattr(tqdm._monitor, "time", fake)
    monkeypatch.setattr(tqdm.tqdm, "monitor", None)
    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0.01)
    yield fake
    if tqdm.tqdm.monitor is not None:
        tqdm.tqdm.monitor.exit()


def test_a_log_gets_a_progress_line_a_minute_not_two(clock: FakeClock, capsys: pytest.CaptureFixture) -> None:
    # tqdm's monitor forced a redraw 10-20 s after each timed one: lines at 01:00 and 01:20, 02:00 and 02:20
    bar = progress_bar(True, total=150, desc="score")
    for second in range(1, 151):
        clock.now = float(second)
        bar.update(1)
        time.sleep(0.003)  # the monitor's turn
    bar.close()
    elapsed = re.findall(r"\[(\d\d:\d\d)<", capsys.readouterr().err)
    assert elapsed == ["00:00", "01:00", "02:00", "02:30"]
