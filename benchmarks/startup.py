"""Start-up cost, as a new user meets it: each figure the median of several fresh processes.

    python -m benchmarks.startup [--runs 7] [--out benchmarks/results/startup.json]

Measured in the same run: `python -c "import mlx.core"` (the floor: the interpreter plus MLX),
`mlx-gemma4u --help`, `python -c "import mlx_gemma4u"`, and `mlx-gemma4u generate --demo
--max-tokens 1`: the time to its first token on stdout (what the user waits for) and to exit.
Goals (issue 19): `--help` and the import under 2x the `import mlx.core` time, the first demo
token under 2 s on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from mlx_gemma4u.files import write_text

from .report import machine

COMMANDS = {
    "import mlx.core": [sys.executable, "-c", "import mlx.core"],
    "mlx-gemma4u --help": [sys.executable, "-m", "mlx_gemma4u", "--help"],
    "import mlx_gemma4u": [sys.executable, "-c", "import mlx_gemma4u"],
    "generate --demo --max-tokens 1": [
        sys.executable,
        "-m",
        "mlx_gemma4u",
        "generate",
        "--demo",
        "--prompt",
        "Hello",
        "--max-tokens",
        "1",
    ],
}


def timed(command: list[str]) -> tuple[float, float]:
    """(seconds to the first byte on stdout, seconds to exit) of one fresh process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    process.stdout.read(1)
    first = time.perf_counter() - start
    process.stdout.read()
    if process.wait() != 0:
        raise SystemExit(f"{' '.join(command)} failed")
    return first, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="fresh processes per command (default 7)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/startup.json"))
    args = parser.parse_args(argv)
    timed(COMMANDS["generate --demo --max-tokens 1"])  # writes the demo once, warms the file cache
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in COMMANDS}
    for _ in range(args.runs):  # interleaved, so a busy moment hits every command alike
        for name, command in COMMANDS.items():
            samples[name].append(timed(command))
    floor = statistics.median(t for _, t in samples["import mlx.core"])
    results = {}
    for name, runs in samples.items():
        exit_s = statistics.median(t for _, t in runs)
        results[name] = {"exit_s": exit_s, "x_import_mlx_core": exit_s / floor}
    results["generate --demo --max-tokens 1"]["first_token_s"] = statistics.median(
        f for f, _ in samples["generate --demo --max-tokens 1"]
    )
    report = {"machine": machine(), "runs": args.runs, "results": results, "load_after": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(report, indent=2))
    print("| command | median (s) | vs `import mlx.core` |\n|---|---|---|")
    for name, r in results.items():
        extra = f" (first token {r['first_token_s']:.2f} s)" if "first_token_s" in r else ""
        print(f"| `{name}` | {r['exit_s']:.3f}{extra} | {r['x_import_mlx_core']:.2f}x |")


if __name__ == "__main__":
    main()
