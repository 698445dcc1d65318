"""Progress lines in a job's log: count, share, rate and time left, at intervals and at the end."""

import logging
import re

from braid.progress import LoggedProgress, progress


def test_a_bar_logs_its_progress_at_intervals_and_once_at_the_end(caplog):
    caplog.set_level(logging.INFO, logger="braid.progress")
    with progress(total=4, desc="tiny model", unit="step", log_every=0.0, mininterval=0) as bar:
        for _ in range(4):
            bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4, lines  # every update (log_every 0), the last one once, not again at close
    assert lines[0].startswith("tiny model: 1/4 step (25 %), ") and ", ETA " in lines[0]
    assert lines[-1].startswith("tiny model: 4/4 step (100 %), ") and "ETA" not in lines[-1]
    assert re.search(r", [0-9.e+]+ step/s, elapsed \d+s", lines[-1])


def test_an_iterated_bar_logs_nothing_before_its_interval_and_its_end_at_close(caplog):
    caplog.set_level(logging.INFO, logger="braid.progress")
    assert list(LoggedProgress(range(50), desc="epochs", log_every=3600, mininterval=0)) == list(range(50))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("epochs: 50/50 it (100 %)"), lines


def test_a_byte_bar_logs_its_sizes_in_binary_units(caplog):
    caplog.set_level(logging.INFO, logger="braid.progress")
    with progress(total=2048, initial=1024, unit="B", unit_scale=True, desc="betas", log_every=3600) as bar:
        bar.update(1024)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("betas: 2.00k/2.00k B (100 %)"), line
