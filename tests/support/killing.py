"""Kill -9 in the middle of a write: the shared half of the atomic-write tests.

The child script makes its own disk write stall half-way, prints "writing" there and sleeps; the
parent kills it with SIGKILL at that moment and leaves the checks of what is on disk to the test.
"""

import os
import signal
import subprocess
import sys


def kill_mid_write(script: str, *args: str) -> None:
    """Run `python -c script *args`, wait for its "writing" line, then SIGKILL it."""
    child = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
