"""The model's Linear and Embedding layers: mlx.nn's, with large matmuls cut by output rows into one
piece per CPU core (cpu_streams.py); bit-identical to mlx.nn's layers.

Each layer also computes any run of its output features on its own, `rows(x, lo, hi)`, so that a
caller can cut two layers together (the MLP's gate and up projections, decoder.MLP).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .cpu_streams import in_pieces


class _Cut:
    """x -> (..., out_features) as `rows` over pieces of the output features."""

    def cut(self, x: mx.array) -> mx.array:
        features = self["weight"].shape[0]
        return in_pieces(lambda lo, hi: self.rows(x, lo, hi), features, x.size * features, axis=-1)


class _FloatRows(_Cut):
    def rows(self, x: mx.array, lo: int, hi: int) -> mx.array:
        """(..., in) -> (..., hi - lo): output features lo to hi, in one piece."""
        w = self["weight"][lo:hi]
        return mx.addmm(self["bias"][lo:hi], x, w.T) if "bias" in self else x @ w.T


class _QuantizedRows(_Cut):
    def rows(self, x: mx.array, lo: int, hi: int) -> mx.array:
        """(..., in) -> (..., hi - lo): output features lo to hi, in one piece."""
        biases = self.get("biases")
        out = mx.quantized_matmul(x, self["weight"][lo:hi], scales=self["scales"][lo:hi],
                                  biases=None if biases is None else biases[lo:hi], transpose=True,
                                  group_size=self.group_size, bits=self.bits, mode=self.mode)
        return out + self["bias"][lo:hi] if "bias" in self else out


class Linear(_FloatRows, nn.Linear):
    def __call__(self, x: mx.array) -> mx.array:
        return self.cut(x)

    def to_quantized(self, group_size: int | None = None, bits: int | None = None, mode: str = "affine",
                     quantize_input: bool = False) -> nn.Module:
        if quantize_input:
            return super().to_quantized(group_size, bits, mode, quantize_input)
        return QuantizedLinear.from_linear(self, group_size, bits, mode)


class QuantizedLinear(_QuantizedRows, nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        return self.cut(x)


class Embedding(_FloatRows, nn.Embedding):
    def as_linear(self, x: mx.array) -> mx.array:
        return self.cut(x)

    def to_quantized(self, group_size: int | None = None, bits: int | None = None, mode: str = "affine",
                     quantize_input: bool = False) -> nn.Module:
        if quantize_input:
            return super().to_quantized(group_size, bits, mode, quantize_input)
        return QuantizedEmbedding.from_embedding(self, group_size, bits, mode)


class QuantizedEmbedding(_QuantizedRows, nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        return self.cut(x)
