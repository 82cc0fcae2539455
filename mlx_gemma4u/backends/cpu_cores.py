"""The CPU-core cut: large independent work in one piece per CPU core, with bit-identical results.

MLX's CPU backend runs the ops of a stream on one thread, and its matmuls (reference BLAS for
float32 on Linux, its own loops for bfloat16 and quantized weights) and attention stay on that
thread: on an N-core machine N - 1 cores idle through every projection, the output head and the
attention of a prefill. `apply` swaps a model's modules, the way nn.quantize swaps layers, for
versions that cut work whose pieces are independent (a matmul's output rows, attention's heads,
the MLP's gate and up together) into one piece per core, compute each piece on a CPU stream of
its own and concatenate the pieces. Every output value is computed exactly as without the cut, so
results are bit-identical (tests/models/test_cpu_cores.py).

On a GPU `apply` changes nothing (its one stream already fills it), nor with
MLX_GEMMA4U_CPU_CORES=1 (to measure the cut, or to leave cores to other work). Quantizing a cut
model (nn.quantize after load()) gives cut quantized layers, so the cut MLP still finds its `rows`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.models.base import scaled_dot_product_attention

from mlx_gemma4u.errors import InputError
from mlx_gemma4u.kernels import gelu_mul
from mlx_gemma4u.models.decoder import MLP, Attention

PIECE_WORK = 1 << 20  # multiply-adds; below about this a piece's hand-over costs more than it saves
_local = threading.local()  # MLX streams belong to the thread that made them


def cpu_cores() -> int:
    """How many pieces large CPU work is cut into: MLX_GEMMA4U_CPU_CORES, else the usable cores."""
    setting = os.environ.get("MLX_GEMMA4U_CPU_CORES")
    if not setting:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not setting.strip().isdigit():
        raise InputError(f"MLX_GEMMA4U_CPU_CORES must be a whole number of cores, got {setting!r}.")
    return max(1, int(setting))


def apply(model: nn.Module) -> nn.Module:
    """On a CPU with more than one core to use, swap the model's Linear and Embedding layers, the
    decoder's MLPs and its attention for cut versions of the same arrays -> the model, updated in place."""
    cores = cpu_cores()
    if cores < 2 or mx.default_device() != mx.cpu:
        return model
    for cuts in (LAYERS, {MLP: CutMLP}):  # an MLP after its layers: it cuts through their `rows`
        swaps = [(name, cuts[type(m)].of(m, cores)) for name, m in model.named_modules() if type(m) in cuts]
        model.update_modules(tree_unflatten(swaps))
    for _, module in model.named_modules():
        if isinstance(module, Attention):
            module.sdpa = partial(attention, cores=cores)
    return model


def across_cores(run: Callable[[int, int], mx.array], size: int, work: int, axis: int, cores: int) -> mx.array:
    """run(0, size), computed as run(lo, hi) over consecutive ranges of [0, size), at most one per
    core and each of at least PIECE_WORK of the `work` multiply-adds, concatenated along `axis`."""
    n = min(cores, work // PIECE_WORK, size)
    if n < 2:
        return run(0, size)
    bounds = [size * i // n for i in range(n + 1)]
    pieces = [run(bounds[0], bounds[1])]
    for stream, lo, hi in zip(_streams(n), bounds[1:-1], bounds[2:]):
        with mx.stream(stream):
            pieces.append(run(lo, hi))
    return mx.concatenate(pieces, axis=axis)


def _streams(n: int) -> list:
    """n - 1 extra CPU streams of this thread (piece 0 runs on the caller's stream)."""
    streams = getattr(_local, "streams", [])
    if len(streams) < n - 1:
        streams = _local.streams = streams + [mx.new_stream(mx.cpu) for _ in range(n - 1 - len(streams))]
    return streams


def attention(q: mx.array, k, v, cache, scale: float, mask, cores: int) -> mx.array:
    """mlx-lm's scaled_dot_product_attention, (B, heads, T, D) queries over (B, kv_heads, K, D) keys
    and values (each a (data, scales, biases) tuple from a quantized cache) -> (B, heads, T, D), in
    pieces of heads: of key-value heads with the queries of their group, or of query heads when they
    all share one key-value head."""
    quantized = isinstance(k, (tuple, list))
    kv_heads, n_keys = (k[0] if quantized else k).shape[1:3]
    group = q.shape[1] // kv_heads if kv_heads > 1 else 1

    def heads(a, lo, hi):
        if kv_heads == 1:
            return a
        return tuple(part[:, lo:hi] for part in a) if quantized else a[:, lo:hi]

    def run(lo, hi):  # joined in the (B, T, heads, D) layout the output projection reads
        out = scaled_dot_product_attention(
            q[:, lo * group : hi * group], heads(k, lo, hi), heads(v, lo, hi), cache, scale=scale, mask=mask
        )
        return out.transpose(0, 2, 1, 3)

    return across_cores(run, q.shape[1] // group, 2 * q.size * n_keys, 2, cores).transpose(0, 2, 1, 3)


class _Cut:
    """A module's cut subclass. `of` makes one from the module itself: the very same arrays,
    children and settings, and `cores`, the most pieces its work is cut into."""

    cores: int

    @classmethod
    def of(cls, module: nn.Module, cores: int) -> nn.Module:
        cut = cls.__new__(cls)
        cut.__dict__.update(module.__dict__, cores=cores)
        dict.update(cut, module)
        return cut


def _part(a: mx.array, lo: int, hi: int) -> mx.array:
    """Rows lo to hi of `a`: `a` itself when that is all of it (an uncut call reads the weight as is)."""
    return a if (lo, hi) == (0, a.shape[0]) else a[lo:hi]


class _Rows(_Cut):
    """A Linear or Embedding that computes any run of its output features on its own, `rows(x, lo,
    hi)`, so that it is cut by them, and the MLP cuts its gate and up projections together."""

    def cut(self, x: mx.array) -> mx.array:
        """(..., in) -> (..., out_features), as `rows` over pieces of the output features."""
        features = self["weight"].shape[0]
        return across_cores(lambda lo, hi: self.rows(x, lo, hi), features, x.size * features, -1, self.cores)


class _FloatRows(_Rows):
    def to_quantized(self, *args, **kwargs) -> nn.Module:
        """mlx.nn's quantized layer, cut as this one is (nn.quantize calls this)."""
        quantized = super().to_quantized(*args, **kwargs)
        return LAYERS[type(quantized)].of(quantized, self.cores)

    def rows(self, x: mx.array, lo: int, hi: int) -> mx.array:
        """(..., in) -> (..., hi - lo): output features lo to hi, in one piece."""
        w = _part(self["weight"], lo, hi)
        return mx.addmm(_part(self["bias"], lo, hi), x, w.T) if "bias" in self else x @ w.T


class _QuantizedRows(_Rows):
    def rows(self, x: mx.array, lo: int, hi: int) -> mx.array:
        """(..., in) -> (..., hi - lo): output features lo to hi, in one piece."""
        w, scales, biases = (
            _part(self[name], lo, hi) if name in self else None for name in ("weight", "scales", "biases")
        )
        out = mx.quantized_matmul(x, w, scales, biases, group_size=self.group_size, bits=self.bits, mode=self.mode)
        return out + _part(self["bias"], lo, hi) if "bias" in self else out


class CutLinear(_FloatRows, nn.Linear):
    def __call__(self, x: mx.array) -> mx.array:
        return self.cut(x)


class CutQuantizedLinear(_QuantizedRows, nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        return self.cut(x)


class CutEmbedding(_FloatRows, nn.Embedding):
    def as_linear(self, x: mx.array) -> mx.array:
        return self.cut(x)


class CutQuantizedEmbedding(_QuantizedRows, nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        return self.cut(x)


LAYERS = {
    nn.Linear: CutLinear,
    nn.QuantizedLinear: CutQuantizedLinear,
    nn.Embedding: CutEmbedding,
    nn.QuantizedEmbedding: CutQuantizedEmbedding,
}


class CutMLP(_Cut, MLP):
    def __call__(self, x: mx.array) -> mx.array:
        """Gate and up are cut together, each piece gated on its own, so neither is ever whole in
        memory: a cut of each, joined and then gated, would hold both twice over. With adapters on
        the projections (models/lora.py) it is the plain MLP over them, their own layers cut."""
        if not (isinstance(self.gate_proj, _Rows) and isinstance(self.up_proj, _Rows)):
            return super().__call__(x)
        hidden = self.gate_proj.weight.shape[0]

        def gated(lo, hi):
            return gelu_mul(self.gate_proj.rows(x, lo, hi), self.up_proj.rows(x, lo, hi))

        return self.down_proj(across_cores(gated, hidden, 2 * x.size * hidden, -1, self.cores))
