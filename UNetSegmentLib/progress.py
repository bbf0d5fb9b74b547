"""Progress reports and cooperative cancellation shared by inference, training and front ends."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from .errors import Cancelled


@dataclass(frozen=True)
class Progress:
    """One progress report: `done` of `total` units of `stage` after `elapsed_s` seconds."""

    done: int
    total: int
    elapsed_s: float
    remaining_s: Optional[float]
    stage: str = "inference"
    loss: Optional[float] = None  # the current training loss (training and fine-tuning reports)

    @property
    def fraction(self) -> float:
        return 1.0 if self.total <= 0 else min(1.0, self.done / self.total)


ProgressCallback = Callable[[Progress], None]


class CancelToken:
    """Set from any thread (GUI, signal handler); checked by the worker between units of work."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled()


class ProgressTracker:
    """Turns (done, total) counts into `Progress` reports with an ETA, and checks cancellation."""

    def __init__(self, total: int, callback: ProgressCallback | None = None,
                 cancel: CancelToken | None = None, stage: str = "inference") -> None:
        self.total = total
        self.callback = callback
        self.cancel = cancel
        self.stage = stage
        self.done = 0
        self._start = time.perf_counter()

    def check_cancel(self) -> None:
        if self.cancel is not None:
            self.cancel.raise_if_cancelled()

    def advance(self, units: int = 1) -> None:
        self.done += units
        elapsed = time.perf_counter() - self._start
        remaining = None
        if self.done > 0 and self.total > 0:
            remaining = max(0.0, elapsed / self.done * (self.total - self.done))
        if self.callback is not None:
            self.callback(Progress(self.done, self.total, elapsed, remaining, self.stage))
