"""Kill points: inert unless armed, and armed ones fire exactly at the n-th hit."""

from __future__ import annotations

import os
import subprocess
import sys

from longvila_jax.core.faults import KILL_ENV


def test_kill_point_fires_at_the_nth_hit(tmp_path):
    code = (
        "from longvila_jax.core import faults\n"
        "for i in range(5):\n"
        "    print(i, flush=True)\n"
        "    faults.hit('site')\n"
    )
    env = {**os.environ, KILL_ENV: "site@3"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == -9
    assert r.stdout.split() == ["0", "1", "2"]
    assert "SIGKILL at site@3" in r.stderr
    env[KILL_ENV] = "other@1"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split() == ["0", "1", "2", "3", "4"]
