"""Running a command under `mlx.launch -n N --backend ring` on this machine, bounded in time, and
finding what is left of it afterwards."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

TIMEOUT_S = 300


def launcher(n: int) -> list[str]:
    """The words that start a command as n local ring processes."""
    return [str(Path(sys.executable).with_name("mlx.launch")), "-n", str(n), "--backend", "ring", "--"]


def launched(n: int, command: list[str], env: dict | None = None, stdout_only: bool = False):
    """`mlx.launch -n n --backend ring -- command` -> (exit code, output), killed with its whole
    process group if it outlives TIMEOUT_S. (mlx.launch exits 0 even when a rank fails.)"""
    process = subprocess.Popen(
        launcher(n) + command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL if stdout_only else subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "MLX_GEMMA4U_CPU_CORES": "1", **(env or {})},
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"mlx.launch did not finish in {TIMEOUT_S} s:\n{output[-3000:]}")
    return process.returncode, output


def left_running(pattern: str) -> str:
    """The command lines of processes still running that match `pattern` (pgrep -f)."""
    return subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True).stdout.strip()


def rank_pid(pattern: str, rank: int) -> int | None:
    """The pid of the process of `rank` (from its environment, MLX_RANK) among those matching
    `pattern` (pgrep -f), if one still runs."""
    for line in left_running(pattern).splitlines():
        pid = int(line.split()[0])
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"MLX_RANK={rank}".encode() in environ:
            return pid
    return None
