"""Each fused kernel against its MLX reference and against the unfused MLX ops, at Gemma 4 12B sizes.

    python -m benchmarks.kernels [--dtype bfloat16] [--tokens 1 512] [--repeats 20]

For 1 token (decoding) and a 512-token prefill chunk, prints the median time per call in
microseconds of:

    metal      the custom Metal kernel ("-" without Metal, or where its self-check turned it off)
    reference  what the dispatcher falls back to (MLX fast ops; mx.compile where it helps)
    unfused    the same math in plain MLX ops (no mx.fast, no mx.compile)

Each sample evaluates 10 independent calls together, so decode-sized figures show the work and
launch cost of a call, not one synchronisation each. The logits (softcap) are one row of the
262,144-token vocabulary whatever the token count, as generation keeps only the last position;
the vision step is one image of 280 patches.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import mlx.core as mx

from mlx_gemma4u.kernels import dispatch
from mlx_gemma4u.models.rope import RoPE

D, HEADS, MLP, VOCAB, PATCHES = 3840, 16, 15360, 262144, 280
FULL_ROPE = {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0}
CALLS_PER_SAMPLE = 10


def rms(x, w, eps):
    return x * mx.rsqrt(mx.mean(mx.square(x.astype(mx.float32)), -1, keepdims=True) + eps).astype(x.dtype) * w


def rotate(x, rope: RoPE, offset: int):
    half = x.shape[-1] // 2
    angle = (offset + mx.arange(x.shape[2]))[:, None] * rope.inverse_frequencies()
    cos, sin = mx.cos(angle).astype(x.dtype), mx.sin(angle).astype(x.dtype)
    a, b = x[..., :half], x[..., half:]
    return mx.concatenate([a * cos - b * sin, a * sin + b * cos], -1)


def layer_norm(x, w, b, eps):
    centered = x - mx.mean(x, -1, keepdims=True)
    return centered * mx.rsqrt(mx.mean(mx.square(centered), -1, keepdims=True) + eps) * w + b


def unfused_residual_norm(x, y, w_post, w_next, eps, scale):
    h = (x + rms(y, w_post, eps)) * scale
    return h, rms(h, w_next, eps)


def unfused_position_norm(h, table, positions, weight, bias, eps):
    valid = (positions != -1)[..., None].astype(table.dtype)
    clamped = mx.maximum(positions, 0)
    embedded = table[clamped[..., 0], 0] * valid[..., 0, :] + table[clamped[..., 1], 1] * valid[..., 1, :]
    return layer_norm(h + embedded, weight, bias, eps)


UNFUSED = {
    "norm_rope": lambda x, w, eps, rope, offset: rotate(rms(x, w, eps).transpose(0, 2, 1, 3), rope, offset),
    "residual_norm": unfused_residual_norm,
    "gelu_mul": lambda gate, up: 0.5 * gate * (1 + mx.tanh(0.7978845608 * (gate + 0.044715 * gate**3))) * up,
    "softcap": lambda x, cap: mx.tanh(x / cap) * cap,
    "position_norm": unfused_position_norm,
}


def cases(tokens: int, dtype) -> list[tuple[str, str, tuple]]:
    """(kernel, label, arguments) at the 12B's sizes."""
    r = lambda *shape: mx.random.normal(shape).astype(dtype)  # noqa: E731
    side = int(PATCHES**0.5) + 1
    positions = mx.array([[[i % side, i // side] for i in range(PATCHES)]])
    return [
        (
            "norm_rope",
            "q, sliding (D 256)",
            (r(1, tokens, HEADS, 256), r(256), 1e-6, RoPE(256, {"rope_theta": 10000.0}), 100),
        ),
        ("norm_rope", "q, full (D 512)", (r(1, tokens, HEADS, 512), r(512), 1e-6, RoPE(512, FULL_ROPE), 100)),
        ("residual_norm", "after MLP (scalar)", (r(1, tokens, D), r(1, tokens, D), r(D), r(D), 1e-6, r(1))),
        ("gelu_mul", "MLP gate", (r(1, tokens, MLP), r(1, tokens, MLP))),
        ("softcap", "logits, last row", (r(1, 1, VOCAB) * 40, 30.0)),
        ("position_norm", "one image", (r(1, PATCHES, D), r(1120, 2, D), positions, r(D), r(D), 1e-5)),
    ]


def median_us(fn: Callable, args: tuple, repeats: int) -> float:
    mx.eval(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval([fn(*args) for _ in range(CALLS_PER_SAMPLE)])
        samples.append((time.perf_counter() - start) / CALLS_PER_SAMPLE * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 512])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    dtype = getattr(mx, args.dtype)
    print(f"device: {mx.default_device()}, Metal: {mx.metal.is_available()}, dtype: {args.dtype}; median µs per call")
    print(f"{'kernel':<14} {'case':<20} {'tokens':>6} {'metal':>9} {'reference':>10} {'unfused':>9}")
    for tokens in args.tokens:
        for name, label, call_args in cases(tokens, dtype):
            kernel = dispatch.KERNELS[name]
            metal = median_us(kernel, call_args, args.repeats) if kernel.uses_metal(*call_args) else None
            reference = median_us(kernel.reference, call_args, args.repeats)
            unfused = median_us(UNFUSED[name], call_args, args.repeats)
            shown = "-" if metal is None else f"{metal:.1f}"
            print(f"{name:<14} {label:<20} {tokens:>6} {shown:>9} {reference:>10.1f} {unfused:>9.1f}")


if __name__ == "__main__":
    main()
