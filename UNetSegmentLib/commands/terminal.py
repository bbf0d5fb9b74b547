"""What a terminal front end adds to a long run: a progress bar with ETA, and Ctrl+C as cancel."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

from ..progress import CancelToken, Progress


class ProgressBar:
    """A new bar per stage; its clock starts when the stage started, not at the first report.

    The first report arrives after the first batch of work, so a bar that timed itself from that
    moment would show an absurd rate and ETA; the report's own `elapsed_s` sets the bar's start.
    """

    def __init__(self, enabled: bool = True, description: str = "", unit: str = "patch", leave: bool = False):
        self.enabled = enabled
        self.description = description
        self.unit = unit
        self.leave = leave
        self.bar = None
        self.stage = None

    def __call__(self, report: Progress) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if report.stage != self.stage or self.bar is None or (report.total and self.bar.total != report.total):
            self.close()
            self.stage = report.stage
            label = f"{self.description} {report.stage}".strip()
            self.bar = tqdm(total=report.total or None, desc=label, unit=self.unit, file=sys.stderr, leave=self.leave)
            self.bar.start_t = self.bar.last_print_t = self.bar._time() - report.elapsed_s
        self.bar.update(report.done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextlib.contextmanager
def cancel_on_interrupt():
    """Ctrl+C sets a CancelToken so the work stops between units and nothing half-done is written."""
    cancel = CancelToken()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.cancel()) if in_main_thread else None
    try:
        yield cancel
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)
