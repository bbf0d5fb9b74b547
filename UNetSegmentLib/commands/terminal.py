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
    """Ctrl+C (and SIGTERM) set a CancelToken so the work stops between units and nothing half-done is
    written; a second signal interrupts at once (temp files are still removed by their `finally`)."""
    cancel = CancelToken()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {}

    def handler(signum, _frame):
        if cancel.cancelled:  # second Ctrl+C: do not wait for the next check
            if signum == getattr(signal, "SIGTERM", None):
                from ..publish import Terminated

                raise Terminated(f"signal {signum}")
            raise KeyboardInterrupt
        cancel.cancel()

    if in_main_thread:
        for name in ("SIGINT", "SIGTERM"):
            if hasattr(signal, name):
                previous[name] = signal.signal(getattr(signal, name), handler)
    try:
        yield cancel
    finally:
        for name, old in previous.items():
            signal.signal(getattr(signal, name), old)


def run_cancellable(function, cancel: CancelToken, poll_s: float = 0.1):
    """Run `function()` in a worker thread while the main thread watches `cancel`.

    The work checks the token between its units, but one unit (a resampling of a large volume) can
    take many seconds in C code; the main thread answers a cancel within `poll_s` instead, leaves the
    worker to stop at its next check (its result is dropped; it writes nothing) and raises Cancelled.
    """
    outcome = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as error:  # noqa: BLE001 - handed to the main thread as is
            outcome["error"] = error

    worker = threading.Thread(target=target, name="unetsegment-work", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(poll_s)
        if cancel.cancelled and worker.is_alive():
            worker.join(min(poll_s * 2, 0.5))  # let a cancel check inside the work end it cleanly
            cancel.raise_if_cancelled()
    if "error" in outcome:
        raise outcome["error"]
    cancel.raise_if_cancelled()
    return outcome.get("value")
