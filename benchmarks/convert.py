"""Converter throughput and peak memory on a multi-GB random checkpoint.

    python -m benchmarks.convert [--layers 4] [--dir /tmp] [--out benchmarks/results/convert.json]

The checkpoint has the real 12B shapes (hidden 3840, MLP 15360, 262,144-token vocabulary, the
real vision and audio embedders) cut to --layers decoder layers, in bfloat16 under transformers'
names: 4 layers is 3.9 GB, of which the token embedding (the largest tensor) is 2.0 GB. Each
conversion runs in its own process; its peak resident memory comes from wait4, its speed is
source bytes over wall time. The converter holds about one tensor at a time, so its peak should
track the largest tensor (times the dtypes it passes through), not the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_gemma4u.convert.converter import write_safetensors
from mlx_gemma4u.models.config import ModelConfig
from mlx_gemma4u.models.layouts import TRANSFORMERS
from mlx_gemma4u.models.model import Model

from .checkpoints import F, S, variant

RUNS = {
    "bfloat16 copy": [],
    "float32": ["--dtype", "float32"],
    "4-bit default": ["-q"],
    "8-bit uniform": ["-q", "--q-bits", "8", "--quant-recipe", "uniform"],
}


def config(layers: int) -> dict:
    """The real 12B shapes cut to `layers` decoder layers, the last one global."""
    return variant(
        dict(
            hidden_size=3840,
            intermediate_size=15360,
            num_hidden_layers=layers,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=256,
            global_head_dim=512,
            layer_types=[S] * (layers - 1) + [F],
        ),
        vision_dim=3840,
    )


def write_checkpoint(out: Path, layers: int) -> None:
    """Random bfloat16 weights, generated and written one tensor at a time."""
    raw = config(layers)
    model = Model(ModelConfig.from_dict(raw))
    weights = {
        TRANSFORMERS.stored(name): (0.02 * mx.random.normal(p.shape)).astype(mx.bfloat16)
        for name, p in tree_flatten(model.parameters())
    }
    del model
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    write_safetensors(out / "model.safetensors", weights)


def run(source: Path, dest: Path, flags: list[str]) -> tuple[float, float]:
    """One conversion in a child process -> (seconds, peak resident GB)."""
    cmd = [
        sys.executable,
        "-m",
        "mlx_gemma4u.cli.main",
        "convert",
        "--hf-path",
        str(source),
        "--mlx-path",
        str(dest),
        "--force",
        "--quiet",
        *flags,
    ]
    start = time.perf_counter()
    child = subprocess.Popen(cmd)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"conversion {flags} failed with status {status}")
    return seconds, usage.ru_maxrss * 1024 / 1e9


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "convert.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        source = Path(tmp) / "source"
        # In a child of its own: a child's peak RSS on Linux starts at its parent's, so this parent stays small.
        code = (
            "from pathlib import Path; from benchmarks.convert import write_checkpoint; "
            f"write_checkpoint(Path({str(source)!r}), {args.layers})"
        )
        subprocess.run([sys.executable, "-c", code], check=True)
        size = (source / "model.safetensors").stat().st_size
        rows = []
        for label, flags in RUNS.items():
            seconds, peak = run(source, Path(tmp) / "out", flags)
            rows.append(
                {
                    "run": label,
                    "source_gb": round(size / 1e9, 2),
                    "seconds": round(seconds, 1),
                    "gb_per_s": round(size / 1e9 / seconds, 3),
                    "peak_rss_gb": round(peak, 2),
                }
            )
            print(rows[-1], flush=True)
    result = {
        "machine": f"{os.uname().sysname} {os.uname().machine}, {os.cpu_count()} cores, MLX {mx.__version__} "
        f"({'GPU' if mx.metal.is_available() else 'CPU'})",
        "layers": args.layers,
        "runs": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
