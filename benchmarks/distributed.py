"""One model across 1, 2 and 3 local processes: prefill and decode tokens/s and peak memory per rank,
pipeline and tensor parallel, with the bytes each token sends.

    python -m benchmarks.distributed [--sizes mid 12b-2l] [--prompt 128] [--tokens 32] [--out FILE]

Each configuration is `mlx.launch -n N --backend ring` of this module's worker: every rank loads its
part (sharded_load_model, the checkpoint's bfloat16), prefills one random prompt and decodes greedily
with the model's own caches (no engine), timed on every rank; rank 0 prints the figures of all.
N = 1 is the same code in one process (a one-rank pipeline). On one machine the ranks share its
cores and talk over loopback, so this measures the overhead of splitting, not a speed-up: the
bytes per token (computed from the model's shapes) give what a Thunderbolt link would carry.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from .checkpoints import ensure_checkpoint
from .compare import CACHE, RESULTS
from .report import save

MODES = ("pipeline", "tensor")
PROCESSES = (1, 2, 3)


def bytes_per_token(config: dict, mode: str, n: int, dtype_bytes: int = 2) -> dict:
    """What one token's pass sends, all ranks together. A ring all_sum of S bytes over n ranks sends
    2 (n - 1) / n x S from each, 2 (n - 1) S in all. Pipeline: the stream (h and its norm, 2 D
    values) over each of the n - 1 stage boundaries, then one all_sum of D. Tensor: two all_sums
    of D per layer (after attention and after the MLP)."""
    text = config["text_config"]
    width, layers = text["hidden_size"], text["num_hidden_layers"]
    all_sum = 2 * (n - 1) * width * dtype_bytes
    if mode == "pipeline":
        return {"bytes_per_token": (n - 1) * 2 * width * dtype_bytes + all_sum, "messages_per_token": n - 1 + (n > 1)}
    return {"bytes_per_token": 2 * layers * all_sum, "messages_per_token": 2 * layers}


def worker(checkpoint: str, mode: str, prompt: int, tokens: int) -> None:
    import mlx.core as mx
    import numpy as np

    from mlx_gemma4u.weights.sharded import sharded_load_model

    group = mx.distributed.init()
    model = sharded_load_model(Path(checkpoint), **{f"{mode}_group": group})
    ids = mx.array(np.random.default_rng(0).integers(1000, 200000, (1, prompt)), dtype=mx.int32)
    cache = model.make_cache()
    mx.reset_peak_memory()
    start = time.perf_counter()
    token = mx.argmax(model(ids, cache=cache, logits_to_keep=1)[:, -1], axis=-1)
    mx.eval(token)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(tokens):
        token = mx.argmax(model(token[:, None], cache=cache)[:, -1], axis=-1)
        mx.eval(token)
    decode_s = time.perf_counter() - start
    mine = [prefill_s, decode_s, mx.get_peak_memory() / 2**20]
    every = mx.distributed.all_sum(mx.zeros((group.size(), 3)).at[group.rank()].add(mx.array(mine)), group=group)
    mx.eval(every)
    if group.rank() == 0:
        rows = np.array(every)
        print(
            json.dumps(
                {
                    "prefill_tok_s": float(prompt / rows[:, 0].max()),
                    "decode_tok_s": float(tokens / rows[:, 1].max()),
                    "peak_mb_per_rank": [round(float(v), 1) for v in rows[:, 2]],
                }
            )
        )


def launch(n: int, checkpoint: Path, mode: str, prompt: int, tokens: int, timeout_s: int = 1800) -> dict:
    launcher = [str(Path(sys.executable).with_name("mlx.launch")), "-n", str(n), "--backend", "ring", "--"]
    launcher = launcher if n > 1 else []  # one process: no launcher (its ring wants two hosts)
    command = [
        sys.executable,
        "-m",
        "benchmarks.distributed",
        "--worker",
        str(checkpoint),
        mode,
        str(prompt),
        str(tokens),
    ]
    proc = subprocess.run(
        launcher + command, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=timeout_s
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        said = proc.stdout.splitlines() + proc.stderr.splitlines()
        errors = [line.split(": ", 1)[-1] for line in said if "Error: " in line]
        return {"error": errors[-1] if errors else "no output"}
    return json.loads(lines[-1])


def table(rows: list[dict]) -> str:
    lines = [
        "| checkpoint | split | processes | prefill tok/s | decode tok/s | peak MB per rank | sent per token |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['mode']} | {r['n']} | {r['error']} | | | |")
            continue
        peaks = ", ".join(f"{p:.0f}" for p in r["peak_mb_per_rank"])
        lines.append(
            f"| {r['size']} | {r['mode']} | {r['n']} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} "
            f"| {peaks} | {r['bytes_per_token'] / 1024:.1f} KB in {r['messages_per_token']} messages |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["mid", "12b-2l"], help="benchmark checkpoints")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--tokens", type=int, default=32, help="decoded tokens")
    parser.add_argument("--out", type=Path, default=RESULTS / "distributed.json")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        checkpoint, mode, prompt, tokens = args.worker
        worker(checkpoint, mode, int(prompt), int(tokens))
        return 0
    rows = []
    for size in args.sizes:
        checkpoint = ensure_checkpoint(size, CACHE)
        config = json.loads((checkpoint / "config.json").read_text())
        for mode in MODES:
            for n in PROCESSES:
                if n == 1 and mode == "tensor":
                    continue  # one process: the same as a one-stage pipeline
                row = {"size": size, "mode": mode if n > 1 else "none", "n": n, **bytes_per_token(config, mode, n)}
                row.update(launch(n, checkpoint, mode, args.prompt, args.tokens))
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    save(args.out, {"prompt": args.prompt, "tokens": args.tokens, "rows": rows}, table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
