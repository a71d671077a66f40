"""Progress of long work as log lines: items done, time spent, time left.

Validation, the teachers' sliding-window inference and pseudo labelling can run for minutes
without a word (two small cases through the SwinUNETR teacher: over six minutes on a CPU). They
report through :class:`ProgressLog`: plain ``logging`` lines, so the terminal and a log file
(``stmt-train`` writes both, and a redirected ``monai.bundle run`` is not a TTY) read the same,
with no carriage-return bars::

    validation: 12 cases
    validation: 1/12 cases (8 %), 0:00:14 elapsed, ~0:02:34 left
    validation: 7/12 cases (58 %), 0:01:38 elapsed, ~0:01:10 left
    validation: 12 cases in 0:02:47

A line is written for the first item, then at most once per ``every_s`` seconds, and the
total time at the end. :class:`EngineProgress` puts one on an ignite engine (the bundles' validators get one from
:class:`stmt_monai.training.handlers.ValidationHandler`).
"""

from __future__ import annotations

import logging
import math
import time
from datetime import timedelta

from ignite.engine import Engine, Events

logger = logging.getLogger(__name__)


def format_seconds(seconds: float) -> str:
    """``83.4`` -> ``"0:01:23"`` (h:mm:ss, whole seconds)."""
    return str(timedelta(seconds=round(max(seconds, 0.0))))


class ProgressLog:
    """Log lines of a loop's progress: done / total, elapsed, estimated time left.

    Args:
        what: what is counted, first word of every line (``"validation"``, ``"pseudo labels"``).
        total: number of items (``None``: unknown, no percentage nor estimate).
        unit: the items' name in the lines (``"cases"``).
        every_s: least seconds between two lines (the first item is always logged, and the end).
        quiet_s: write nothing unless the loop is still running after this many seconds (the
            start line and short loops are then left out: the sliding window of each case).
        log: the logger (default this module's).
        enabled: ``False`` writes nothing (a caller's ``progress=False``).
    """

    def __init__(
        self,
        what: str,
        total: int | None = None,
        unit: str = "cases",
        every_s: float = 10.0,
        quiet_s: float = 0.0,
        log: logging.Logger | None = None,
        enabled: bool = True,
    ):
        self.what, self.total, self.unit = what, total, unit
        self.every_s, self.quiet_s = float(every_s), float(quiet_s)
        self.log = log or logger
        self.enabled = bool(enabled)
        self.done = 0
        self.start_time = self.last_time = time.perf_counter()
        self.started = self.logged = False
        self.lines: list[str] = []  # what was logged

    def _emit(self, line: str) -> None:
        if not self.enabled:
            return
        self.lines.append(line)
        self.log.info(line)

    def start(self, total: int | None = None) -> ProgressLog:
        """Begin (again): reset the count and the clock; log the total unless ``quiet_s``."""
        if total is not None:
            self.total = int(total)
        self.done = 0
        self.start_time = self.last_time = time.perf_counter()
        self.started, self.logged = True, False
        if not self.quiet_s:
            count = f"{self.total} {self.unit}" if self.total is not None else f"started ({self.unit})"
            self._emit(f"{self.what}: {count}")
            self.logged = True
        return self

    def line(self, note: str = "") -> str:
        """The progress line now, e.g. ``validation: 3/12 cases (25 %), 0:00:42 elapsed, ~0:02:06 left``."""
        elapsed = time.perf_counter() - self.start_time
        if self.total:
            share = self.done / self.total
            left = elapsed / self.done * (self.total - self.done) if self.done else math.nan
            text = f"{self.what}: {self.done}/{self.total} {self.unit} ({100 * share:.0f} %), {format_seconds(elapsed)} elapsed"
            if self.done < self.total and not math.isnan(left):
                text += f", ~{format_seconds(left)} left"
        else:
            text = f"{self.what}: {self.done} {self.unit}, {format_seconds(elapsed)} elapsed"
        return text + (f" [{note}]" if note else "")

    def update(self, n: int = 1, note: str = "") -> None:
        """``n`` more items done; log a line if it is the first, or ``every_s`` passed (not for the
        last: :meth:`finish` says it)."""
        if not self.started:
            self.start()
        self.done += n
        now = time.perf_counter()
        if now - self.start_time < self.quiet_s:
            return
        first = not self.logged or self.done == n
        last = self.total is not None and self.done >= self.total
        if not last and (first or now - self.last_time >= self.every_s):
            self._emit(self.line(note))
            self.last_time = now
            self.logged = True

    def finish(self) -> None:
        """Log the total time (if anything was logged, or the loop outlasted ``quiet_s``)."""
        elapsed = time.perf_counter() - self.start_time
        if self.logged:
            self._emit(f"{self.what}: {self.done} {self.unit} in {format_seconds(elapsed)}")


class EngineProgress:
    """An ignite engine's iterations as :class:`ProgressLog` lines (cases of a validation run).

    Attach to an evaluator: at each run's start the total is its epoch length (the validation
    loader's length, one case per iteration in the bundles), then a line per case as
    :class:`ProgressLog` throttles them, and the run's total time.

    Args:
        what, unit, every_s: see :class:`ProgressLog`.
    """

    def __init__(self, what: str = "validation", unit: str = "cases", every_s: float = 10.0):
        self.progress = ProgressLog(what, None, unit, every_s)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def started(self, engine: Engine) -> None:
        self.progress.start(engine.state.epoch_length)

    def iteration_completed(self, engine: Engine) -> None:
        self.progress.update()

    def completed(self, engine: Engine) -> None:
        self.progress.finish()
