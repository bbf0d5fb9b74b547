"""The terminal progress bar times a stage from its start, and Ctrl+C becomes a cancel token."""

import os
import signal

from UNetSegmentLib.commands.terminal import ProgressBar, cancel_on_interrupt
from UNetSegmentLib.progress import Progress


def test_bar_rate_counts_the_work_done_before_the_first_report(capsys):
    bar = ProgressBar(True, "test")
    bar(Progress(4, 8, elapsed_s=2.0, remaining_s=2.0))
    rate = bar.bar.format_dict["rate"] or bar.bar.n / (bar.bar._time() - bar.bar.start_t)
    assert bar.bar.n == 4
    assert 1.0 < rate < 2.5  # 4 patches in ~2 s, not 4 patches in the microseconds since the bar was made
    bar(Progress(8, 8, elapsed_s=4.0, remaining_s=0.0))
    assert bar.bar.n == 8
    bar(Progress(1, 3, elapsed_s=0.5, remaining_s=1.0, stage="validation"))
    assert bar.bar.total == 3 and bar.bar.n == 1  # a new stage gets a new bar
    bar.close()
    assert bar.bar is None


def test_disabled_bar_draws_nothing(capsys):
    bar = ProgressBar(False)
    bar(Progress(1, 2, elapsed_s=0.1, remaining_s=0.1))
    assert bar.bar is None
    assert capsys.readouterr().err == ""


def test_ctrl_c_sets_the_cancel_token_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGINT)
    with cancel_on_interrupt() as cancel:
        assert not cancel.cancelled
        os.kill(os.getpid(), signal.SIGINT)
        assert cancel.cancelled
    assert signal.getsignal(signal.SIGINT) is before
