"""Batched decoding: aggregate decode tokens/s, per-sequence latency and KV memory per sequence.

    python -m benchmarks.batching [--sizes mid 12b-2l] [--batches 1 2 4 8 16] [--tokens 32]

For each checkpoint (benchmarks/checkpoints.py, cast to --dtype) and batch size B, B different text
prompts are decoded greedily for --tokens tokens each, by our batch_generate and by mlx-vlm
0.7.10's batch_generate, one after the other in this process. Figures per row:

    decode tok/s    all rows' tokens after the first / the time after the first (prefill excluded)
    latency s       mean time from submission to a row's last token (ours); mlx-vlm's whole call
    MB / seq        (peak memory during the batch - memory before it) / B
    exact           whether our first two rows equal their prompts' stream_generate alone (ours only)

Random weights rarely reach an end-of-turn token; a row that does stops early, and the decoded
token counts say so.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import mlx.core as mx

from .checkpoints import ensure_checkpoint
from .compare import CACHE

TOPICS = ["the sea", "a mountain", "the city", "a river", "the desert", "a forest", "the sky", "a garden"]


def prompts(n: int) -> list[str]:
    """n different text prompts of slightly different lengths."""
    return [f"Write about {TOPICS[i % len(TOPICS)]}" + " please" * (i // len(TOPICS)) for i in range(n)]


def ours(path: Path, dtype: str, batches: list[int], tokens: int) -> list[dict]:
    from mlx_gemma4u import load, stream_generate
    from mlx_gemma4u.generation.engine import BatchGenerator

    model, processor = load(path, dtype=dtype)
    rows = []
    for size in batches:
        texts = prompts(size)
        gc.collect()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        generator = BatchGenerator(model, processor, max_batch=size)
        uids = [generator.submit(t, max_tokens=tokens) for t in texts]
        generator.step()  # prefill of every row and the first decode step queued
        start, first = time.perf_counter(), sum(len(generator.responses[u].tokens) for u in uids)
        while not generator.done:
            generator.step()
        elapsed = time.perf_counter() - start
        peak = mx.get_peak_memory()
        replies = [generator.responses[u] for u in uids]
        n = sum(len(r.tokens) for r in replies)
        exact = all(
            r.tokens == [s.token for s in stream_generate(model, processor, t, max_tokens=tokens)]
            for t, r in zip(texts[:2], replies[:2])
        )  # two rows checked, to keep the run short
        rows.append(
            {
                "impl": "ours",
                "batch": size,
                "tokens": n,
                "decode_tps": (n - first) / elapsed,
                "latency_s": sum(r.latency for r in replies) / size,
                "mb_per_seq": (peak - base) / size / 1e6,
                "exact": exact,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def mlx_vlm(path: Path, dtype: str, batches: list[int], tokens: int) -> list[dict]:
    from mlx_vlm import batch_generate, load

    model, processor = load(str(path))
    model.set_dtype(getattr(mx, dtype))
    rows = []
    for size in batches:
        gc.collect()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        start = time.perf_counter()
        out = batch_generate(model, processor, prompts=prompts(size), max_tokens=tokens)  # greedy by default
        elapsed = time.perf_counter() - start
        peak = mx.get_peak_memory()
        stats = out.stats
        rows.append(
            {
                "impl": "mlx-vlm",
                "batch": size,
                "tokens": stats.generation_tokens,
                "decode_tps": stats.generation_tps,
                "latency_s": elapsed,
                "mb_per_seq": (peak - base) / size / 1e6,
                "exact": None,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(results: dict[str, list[dict]]) -> str:
    """Markdown: one line per checkpoint and batch size, ours beside mlx-vlm."""
    lines = [
        "| checkpoint | batch | ours decode tok/s | mlx-vlm decode tok/s | ours latency s | "
        "mlx-vlm call s | ours MB/seq | mlx-vlm MB/seq | rows exact |",
        "|" + "---|" * 9,
    ]
    for size, rows in results.items():
        by = {(r["impl"], r["batch"]): r for r in rows}
        for batch in sorted({r["batch"] for r in rows}):
            o, v = by.get(("ours", batch), {}), by.get(("mlx-vlm", batch), {})
            cells = [
                f"{o.get('decode_tps', 0):.1f}",
                f"{v.get('decode_tps', 0):.1f}",
                f"{o.get('latency_s', 0):.2f}",
                f"{v.get('latency_s', 0):.2f}",
                f"{o.get('mb_per_seq', 0):.1f}",
                f"{v.get('mb_per_seq', 0):.1f}",
                "yes" if o.get("exact") else "no",
            ]
            lines.append(f"| {size} | {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.batching", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", choices=["demo", "mid", "12b-2l"], default=["mid", "12b-2l"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--tokens", type=int, default=16, help="decode tokens per row")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="weights (float32: the CPU backend's fast matmuls)",
    )
    parser.add_argument("--cache", type=Path, default=CACHE, help=f"where the random checkpoints live ({CACHE})")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    results = {}
    for size in args.sizes:
        path = ensure_checkpoint(size, args.cache)
        results[size] = ours(path, args.dtype, args.batches, args.tokens) + mlx_vlm(
            path, args.dtype, args.batches, args.tokens
        )
        gc.collect()
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
