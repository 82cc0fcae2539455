"""Where a prefill and a decode step spend their time: each part of our model timed on its own, on one
CPU core and cut across all of them (mlx_gemma4u/backends/cpu_cores.py), in one process.

    python -m benchmarks.profile [--sizes demo mid 12b-2l] [--dtype bfloat16] [--tokens 512]
                                 [--out benchmarks/results/profile.json]

Parts: one sliding and one full decoder layer's attention (projections, norms, RoPE, cache update,
attention) and MLP, each over `tokens` prompt positions (prefill) and over one position after them
(decode), and the output head over one position (what both a prefill and a decode step run). Each
figure is the median of --repeats evaluations, in milliseconds: first all on one core (the model
loaded plain), then all with the model cut across the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from mlx_gemma4u.files import write_text

from .checkpoints import SIZES, ensure_checkpoint
from .compare import CACHE
from .report import machine

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "profile.json"


def median_ms(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def parts(model, tokens: int) -> dict:
    """Part name -> a function that evaluates that part once, from fresh caches."""
    import mlx.core as mx

    from mlx_gemma4u.models.config import FULL

    text = model.config.text
    layers = {
        kind: next(i for i, s in enumerate(text.layers) if s.layer_type == kind and s.kv_mode != "reuse")
        for kind in ("sliding_attention", FULL)
    }
    x = mx.random.normal((1, tokens + 1, text.hidden_size)).astype(model.language_model.norm.weight.dtype)
    mx.eval(x)
    out = {}
    for phase, (lo, hi) in {"prefill": (0, tokens), "decode": (tokens, tokens + 1)}.items():
        for kind, index in layers.items():
            layer = model.language_model.layers[index]
            out[f"{phase} {kind.split('_')[0]} attention"] = _attention(model, layer, index, x, lo, hi)
            out[f"{phase} {kind.split('_')[0]} MLP"] = lambda layer=layer, lo=lo, hi=hi: mx.eval(layer.mlp(x[:, lo:hi]))
    out["head (one position)"] = lambda: mx.eval(model.logits(x[:, -1:]))
    return out


def _attention(model, layer, index, x, lo, hi):
    """Prefill: positions lo:hi into fresh caches each time. Decode: one position after a prompt
    cached once (each run adds its position, a few over `tokens` in all)."""
    import mlx.core as mx

    slot = model.language_model._cache_slot[index]
    prompt = model.make_cache()[slot]
    if lo:
        mx.eval(layer.self_attn(x[:, :lo], model._step((1, lo), [prompt], None, None), prompt))

    def run():
        cache = prompt if lo else model.make_cache()[slot]
        mx.eval(layer.self_attn(x[:, lo:hi], model._step((1, hi - lo), [cache], None, None), cache))

    return run


def profile(size: str, dtype: str, tokens: int, repeats: int) -> dict:
    from mlx_gemma4u.backends import cpu_cores
    from mlx_gemma4u.weights.loading import load_model

    cores = cpu_cores.cpu_cores()
    os.environ["MLX_GEMMA4U_CPU_CORES"] = "1"  # loaded plain for the one-core figures, cut after them
    model = load_model(ensure_checkpoint(size, CACHE), dtype=dtype)
    runs = parts(model, tokens)
    one = {name: median_ms(run, repeats) for name, run in runs.items()}
    os.environ["MLX_GEMMA4U_CPU_CORES"] = str(cores)
    cpu_cores.apply(model)
    os.environ.pop("MLX_GEMMA4U_CPU_CORES")
    return {
        name: {"one core ms": one[name], f"{cores} cores ms": median_ms(run, repeats)} for name, run in runs.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["demo", "mid"])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--tokens", type=int, default=512, help="prompt positions (default 512)")
    parser.add_argument("--repeats", type=int, default=5, help="evaluations per figure (default 5)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    report = {"machine": machine(), "dtype": args.dtype, "tokens": args.tokens, "results": {}}
    for size in args.sizes:
        report["results"][size] = result = profile(size, args.dtype, args.tokens, args.repeats)
        for name, cell in result.items():
            one, many = cell.values()
            print(f"{size:7s} {name:32s} {one:9.1f} ms  {many:9.1f} ms  {one / many:5.2f}x", flush=True)
    write_text(args.out, json.dumps(report, indent=1))
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
