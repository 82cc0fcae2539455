"""The projection shared by images and audio, and the scatter of soft tokens into the prompt.

Soft tokens replace placeholder tokens (`<|image|>`, `<|video|>`, `<|audio|>`) in row-major
(batch, sequence) order, after the text embeddings were scaled; they are not scaled themselves.

Norm statistics over raw media (6,912 pixel values, 640 audio samples) use `two_step_mean`: one
float32 pass over that many values (MLX's CPU reduction) drifts about 1e-5 relative, and
normalizing a flat patch or a quiet frame magnifies that far past transformers' float32 result.
"""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_gemma4u.errors import InputError

PIECE = 512  # the widest run of products a float32 media Linear adds in one go


def two_step_mean(x: mx.array) -> mx.array:
    """(..., n) -> (..., 1) mean, reduced over a chunks of n / a values and then over the chunks
    (a the largest divisor of n up to sqrt(n)), which keeps float32 rounding near transformers'."""
    n = x.shape[-1]
    chunks = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return x.reshape(*x.shape[:-1], chunks, -1).mean(axis=-1).mean(axis=-1, keepdims=True)


class MultimodalEmbedder(nn.Module):
    """Scale-free RMSNorm, then a Linear into the decoder's width: (..., in_dim) -> (..., out_dim)."""

    def __init__(self, in_dim: int, out_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.embedding_projection = nn.Linear(in_dim, out_dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        dtype = compute_dtype(self.embedding_projection)
        x = x.astype(dtype).astype(mx.float32)  # rounded to the model dtype, normalized in float32
        normed = x * mx.rsqrt(two_step_mean(x * x) + self.eps)
        return project(self.embedding_projection, normed, dtype)


def project(layer: nn.Module, x: mx.array, dtype: mx.Dtype) -> mx.array:
    """x through a media Linear that computes in `dtype` -> (..., out) in `dtype`.

    A quantized layer has no transformers counterpart to match, so it gets float32 inputs: MLX's
    quantized matmul sums in its input dtype (on the CPU backend 5% off in bfloat16, 0.6% in float32).
    A float32 layer sums its products in pieces (`summed_in_pieces`). A LoRA adapter (models/lora.py)
    adds its low-rank update to its base layer's result.
    """
    if "lora_a" in layer:
        low_rank = (layer.dropout(x) @ layer.lora_a) @ layer.lora_b
        return project(layer.linear, x, dtype) + (layer.scale * low_rank).astype(dtype)
    if isinstance(layer, nn.QuantizedLinear):
        return layer(x.astype(mx.float32)).astype(dtype)
    if dtype == mx.float32:
        return summed_in_pieces(layer, x)
    return layer(x.astype(dtype))


def summed_in_pieces(layer: nn.Linear, x: mx.array, piece: int = PIECE) -> mx.array:
    """layer(x) for a float32 Linear, its input width split into pieces of at most `piece` values whose
    partial products are added up after.

    MLX's matmul adds the products of one output in order, so its rounding error grows with the
    width (several times torch's at the projector's 6,912); summing pieces of at most 432 keeps it
    at torch's (docs/exactness.md).
    """
    n = x.shape[-1]
    pieces = next(d for d in range(1, n + 1) if n % d == 0 and n // d <= piece)
    if pieces == 1:
        return layer(x)
    w, size = layer.weight, n // pieces
    out = None
    for i in range(pieces):
        part = x[..., i * size : (i + 1) * size] @ w[:, i * size : (i + 1) * size].T
        out = part if out is None else out + part
    return out + layer.bias if "bias" in layer else out


def compute_dtype(layer: nn.Module) -> mx.Dtype:
    """The floating dtype a (possibly quantized) layer computes in: its weights', an affine layer's
    scales', else bfloat16 (what MLX dequantizes mxfp4 / nvfp4 / mxfp8 layers to); an adapter's base's."""
    layer = layer.linear if "linear" in layer else layer
    for a in (layer.weight, getattr(layer, "scales", None)):
        if a is not None and mx.issubdtype(a.dtype, mx.floating):
            return a.dtype
    return mx.bfloat16


def placeholder_positions(input_ids: mx.array, token_id: int) -> np.ndarray:
    """Flat (batch * seq) indices of every `token_id` in input_ids, in row-major order."""
    return np.flatnonzero(np.array(input_ids).reshape(-1) == token_id)


def kept_rows(soft: mx.array, keep: np.ndarray) -> mx.array:
    """(N, P, D) soft tokens and an (N, P) boolean mask -> (M, D): the M kept ones, in row-major order."""
    return soft.reshape(-1, soft.shape[-1])[mx.array(np.flatnonzero(keep.reshape(-1)))]


def scatter_soft_tokens(h: mx.array, positions: np.ndarray, features: mx.array, what: str) -> mx.array:
    """Write features (N, D) over h (B, T, D) at the N flat positions."""
    if len(positions) != features.shape[0]:
        raise InputError(
            f"The prompt has {len(positions)} {what} placeholder tokens but the {what} inputs give "
            f"{features.shape[0]} soft tokens; each {what} needs exactly as many placeholders as it has "
            "soft tokens (let the processor expand the prompt)."
        )
    B, T, D = h.shape
    flat = h.reshape(B * T, D)
    flat[mx.array(positions)] = features.astype(h.dtype)
    return flat.reshape(B, T, D)
