"""The model's Linear and Embedding layers: mlx.nn's, with large matmuls spread over the CPU's cores.

MLX's CPU backend runs the ops of a stream on one thread, and its matmuls (reference BLAS for
float32 on Linux, its own loops for bfloat16 and quantized weights) stay on that thread: on an
N-core machine N - 1 cores idle through every projection and the output head. Here a large matmul
is cut by output rows into one piece per core (each of at least SPLIT_MACS multiply-adds), each
piece computed on a CPU stream of its own, and the pieces are concatenated. Each output is still the same dot
product over the same inputs in the same order, so the result is bit-identical to the unsplit
matmul (tests/test_linear.py); measured 1.9x on 2 cores for the 262,144-wide head.

On a GPU nothing changes: its one stream already fills it. MLX_GEMMA4U_CPU_CORES=1 turns the
split off (to measure it, or to leave cores to other work).
"""

from __future__ import annotations

import os
import threading
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

SPLIT_MACS = 1 << 20  # below about this many multiply-adds the streams' hand-over costs more than it saves
_local = threading.local()  # MLX streams belong to the thread that made them


def cpu_cores() -> int:
    """How many pieces a large CPU matmul is cut into: MLX_GEMMA4U_CPU_CORES, else the usable cores."""
    setting = os.environ.get("MLX_GEMMA4U_CPU_CORES")
    if setting:
        return max(1, int(setting))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _streams(n: int) -> list:
    """n - 1 extra CPU streams of this thread (piece 0 runs on the caller's stream)."""
    streams = getattr(_local, "streams", [])
    if len(streams) < n - 1:
        streams = _local.streams = streams + [mx.new_stream(mx.cpu) for _ in range(n - 1 - len(streams))]
    return streams


def spread(matmul: Callable[..., mx.array], x: mx.array, *weights: mx.array) -> mx.array:
    """matmul(x, *weights) -> (..., N), where every weight is (N, ...) by output row, computed in
    pieces of rows on one CPU stream per core when the product is large enough to pay for it."""
    rows = weights[0].shape[0]
    macs = x.size * rows
    n = min(cpu_cores(), macs // SPLIT_MACS, rows)
    if n < 2 or mx.default_device() != mx.cpu:
        return matmul(x, *weights)
    bounds = [rows * i // n for i in range(n + 1)]
    pieces = [matmul(x, *(w[bounds[0]:bounds[1]] for w in weights))]
    for stream, lo, hi in zip(_streams(n), bounds[1:-1], bounds[2:]):
        with mx.stream(stream):
            pieces.append(matmul(x, *(w[lo:hi] for w in weights)))
    return mx.concatenate(pieces, axis=-1)


def _times_transposed(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    return x @ weight.T if bias is None else mx.addmm(bias, x, weight.T)


def _quantized(layer: nn.Module) -> Callable[..., mx.array]:
    """x, weight, scales[, biases] -> x times the layer's dequantized weight, transposed."""
    def matmul(x, weight, scales, biases=None):
        return mx.quantized_matmul(x, weight, scales=scales, biases=biases, transpose=True,
                                   group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
    return matmul


def _quantized_weights(layer: nn.Module) -> list[mx.array]:
    return [layer["weight"], layer["scales"]] + ([layer["biases"]] if layer.get("biases") is not None else [])


class Linear(nn.Linear):
    def __call__(self, x: mx.array) -> mx.array:
        return spread(_times_transposed, x, self["weight"], *([self["bias"]] if "bias" in self else []))

    def to_quantized(self, group_size: int | None = None, bits: int | None = None, mode: str = "affine",
                     quantize_input: bool = False) -> nn.Module:
        if quantize_input:
            return super().to_quantized(group_size, bits, mode, quantize_input)
        return QuantizedLinear.from_linear(self, group_size, bits, mode)


class QuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        out = spread(_quantized(self), x, *_quantized_weights(self))
        return out + self["bias"] if "bias" in self else out


class Embedding(nn.Embedding):
    def as_linear(self, x: mx.array) -> mx.array:
        return spread(_times_transposed, x, self["weight"])

    def to_quantized(self, group_size: int | None = None, bits: int | None = None, mode: str = "affine",
                     quantize_input: bool = False) -> nn.Module:
        if quantize_input:
            return super().to_quantized(group_size, bits, mode, quantize_input)
        return QuantizedEmbedding.from_embedding(self, group_size, bits, mode)


class QuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        return spread(_quantized(self), x, *_quantized_weights(self))
