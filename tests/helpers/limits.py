"""A wall-clock limit for one block of a test: a FIFO read that blocks, a parser that spins.

``SIGALRM`` interrupts the main thread wherever it waits (a blocking ``open`` of a FIFO
included), so a regression fails the test instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import signal


class Hang(Exception):
    """The block ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float, error: type[Exception] = Hang):
    """Raises ``error`` in the main thread if the block runs longer than ``seconds``."""

    def on_alarm(signum, frame):
        raise error(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
