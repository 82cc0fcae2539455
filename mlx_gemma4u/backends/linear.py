"""The model's Linear and Embedding layers: mlx.nn's, with large matmuls cut by output rows into one
piece per CPU core (cpu_streams.py); bit-identical to mlx.nn's layers.

Each layer also computes any run of its output features on its own, `rows(x, lo, hi)`, so that a
caller can cut two layers together (the MLP's gate and up projections, decoder.MLP).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlx_gemma4u.backends.cpu_streams import in_pieces


class _Cut:
    """x -> (..., out_features) as `rows` over pieces of the output features."""

    def cut(self, x: mx.array) -> mx.array:
        features = self["weight"].shape[0]
        return in_pieces(lambda lo, hi: self.rows(x, lo, hi), features, x.size * features, axis=-1)


def _part(a: mx.array, lo: int, hi: int) -> mx.array:
    """Rows lo to hi of `a`: `a` itself when that is all of it (an uncut call reads the weight as is)."""
    return a if (lo, hi) == (0, a.shape[0]) else a[lo:hi]


class _FloatRows(_Cut):
    def rows(self, x: mx.array, lo: int, hi: int) -> mx.array:
        """(..., in) -> (..., hi - lo): output features lo to hi, in one piece."""
        w = _part(self["weight"], lo, hi)
        return mx.addmm(_part(self["bias"], lo, hi), x, w.T) if "bias" in self else x @ w.T


class _QuantizedRows(_Cut):
    def rows(self, x: mx.array, lo: int, hi: int) -> mx.array:
        """(..., in) -> (..., hi - lo): output features lo to hi, in one piece."""
        biases = self.get("biases")
        out = mx.quantized_matmul(x, _part(self["weight"], lo, hi), scales=_part(self["scales"], lo, hi),
                                  biases=None if biases is None else _part(biases, lo, hi), transpose=True,
                                  group_size=self.group_size, bits=self.bits, mode=self.mode)
        return out + _part(self["bias"], lo, hi) if "bias" in self else out


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
