"""Named kill and stall points for the fault tests; inert unless a test arms one.

``LONGVILA_TEST_KILL=<site>@<n>`` arms one point: the process SIGKILLs itself when it reaches
``hit(site, n)`` (sites that know their training step pass it), or, for sites that pass no
step, the ``n``-th time it reaches ``hit(site)`` (1-based, counted per process). The training
loop's save-window sites (``train.kill_switch.KillSwitch``) use the same variable. Unset, or set
to a site nobody calls, this module does nothing; no library code path depends on it.

``LONGVILA_TEST_STALL=<site>:<text>`` makes ``stall(site, key)`` block forever when ``text``
occurs in ``key``: a decoder that hangs on one file, for the decode sandbox's timeout test.
"""

from __future__ import annotations

import collections
import os
import signal
import sys
import time

KILL_ENV = "LONGVILA_TEST_KILL"
STALL_ENV = "LONGVILA_TEST_STALL"
_counts: collections.Counter[str] = collections.Counter()


def armed() -> tuple[str, int] | None:
    """The armed ``(site, n)``, or None."""
    spec = os.environ.get(KILL_ENV, "")
    site, _, n = spec.partition("@")
    if not site or not n.isdigit():
        return None
    return site, int(n)


def die(label: str) -> None:
    """SIGKILLs this process after saying where (tests match the message)."""
    sys.stderr.write(f"[kill-switch] SIGKILL at {label}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def hit(site: str, step: int | None = None) -> None:
    """A kill point: kills the process if ``site`` is armed for ``step`` (or, without a step,
    for this occurrence of ``site``)."""
    spec = armed()
    if spec is None or spec[0] != site:
        return
    if step is None:
        _counts[site] += 1
        step = _counts[site]
    if step == spec[1]:
        die(f"{site}@{step}")


def stall(site: str, key: str) -> None:
    """A stall point: blocks this thread forever if ``site`` is armed for a ``key`` containing
    the armed text (the caller's watchdog must kill the process)."""
    armed_site, sep, text = os.environ.get(STALL_ENV, "").partition(":")
    if sep and armed_site == site and text and text in key:
        while True:
            time.sleep(3600)


__all__ = ["KILL_ENV", "STALL_ENV", "armed", "die", "hit", "stall"]
