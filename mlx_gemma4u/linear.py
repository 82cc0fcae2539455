"""The model's Linear and Embedding layers: mlx.nn's, with large matmuls cut by output rows into one
piece per CPU core (cpu_streams.py); bit-identical to mlx.nn's layers.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from .cpu_streams import in_pieces


def spread(matmul: Callable[..., mx.array], x: mx.array, *weights: mx.array) -> mx.array:
    """matmul(x, *weights) -> (..., N), where every weight is (N, ...) by output row, in pieces of
    rows on the CPU's cores when the product is large enough to pay for it."""
    rows = weights[0].shape[0]
    return in_pieces(lambda lo, hi: matmul(x, *(w[lo:hi] for w in weights)), rows, x.size * rows, axis=-1)


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
