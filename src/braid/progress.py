"""Progress of long steps, on the terminal and in the job's log.

A tqdm bar draws on stderr, which a terminal shows and SLURM keeps in its output file, but a
job's ``log:`` file (``logs/...``) would say nothing for the whole of a 30-minute step.
:class:`LoggedProgress` is a tqdm bar that also writes a line to the log every
:data:`LOG_EVERY` seconds and when it completes: the step, count, rate and time left.
"""

from __future__ import annotations

import logging
import time

from tqdm import tqdm

LOG_EVERY = 30.0  # seconds between progress lines in a log

log = logging.getLogger("braid.progress")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class LoggedProgress(tqdm):
    """``tqdm`` that logs ``desc: n/total unit (p %), rate unit/s, elapsed, ETA`` every ``log_every`` s."""

    def __init__(self, *args, log_every: float = LOG_EVERY, logger: logging.Logger | None = None, **kwargs):
        self._log_every = log_every
        self._logger = logger or log
        self._last_log = time.monotonic()
        self._logged_end = False
        super().__init__(*args, **kwargs)

    def line(self) -> str:
        """The progress line for the log."""
        d = self.format_dict
        n, total, elapsed, unit = d["n"], d["total"], d["elapsed"], d["unit"]
        rate = (n - self.initial) / elapsed if elapsed > 0 else 0.0
        size = (lambda v: tqdm.format_sizeof(v, divisor=1024)) if d.get("unit_scale") else str
        count = f"{size(n)}/{size(total)} {unit}" if total else f"{size(n)} {unit}"
        share = f" ({100 * n / total:.0f} %)" if total else ""
        eta = f", ETA {_duration((total - n) / rate)}" if total and rate > 0 and n < total else ""
        return f"{self.desc or 'progress'}: {count}{share}, {size(rate) if size is not str else f'{rate:.3g}'} {unit}/s, elapsed {_duration(elapsed)}{eta}"

    def update(self, n=1):
        shown = super().update(n)
        now = time.monotonic()
        done = bool(self.total) and self.n >= self.total
        if (now - self._last_log >= self._log_every and not done) or (done and not self._logged_end):
            self._last_log = now
            self._logged_end = done
            self._logger.info("%s", self.line())
        return shown

    def close(self):
        if not self.disable and not self._logged_end and self.n > self.initial:
            self._logged_end = True
            self._logger.info("%s", self.line())
        super().close()


def progress(*args, **kwargs) -> LoggedProgress:
    """A :class:`LoggedProgress` bar (tqdm's arguments; ``log_every``, ``logger``)."""
    return LoggedProgress(*args, **kwargs)
