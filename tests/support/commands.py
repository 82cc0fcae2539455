"""Runs the `mlx-gemma4u` command as a user would: a fresh process, offline, in its own home."""

import os
import subprocess
import sys
from pathlib import Path


def cli(*args: str, home: Path, cwd: Path | None = None, stdin: str = "") -> subprocess.CompletedProcess:
    """`python -m mlx_gemma4u *args` with MLX_GEMMA4U_HOME=home; the caller judges the exit status."""
    env = {**os.environ, "MLX_GEMMA4U_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mlx_gemma4u", *args],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )
