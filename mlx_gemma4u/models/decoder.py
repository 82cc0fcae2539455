"""The Gemma 4 text decoder.

Per layer:

    a = x + post_attn_norm(attention(input_norm(x)))
    b = a + post_ffw_norm(mlp(pre_ffw_norm(a)))
    x' = b * layer_scalar

Attention has QK-norm, a scale-free V-norm, scaling 1.0, RoPE per layer type, and grouped-query
heads whose count and size differ on full layers. On full layers with `attention_k_eq_v` the value
is the raw key projection. The last `num_kv_shared_layers` layers reuse the keys and values of the
last earlier layer of their type instead of computing their own.

The per-token element-wise work goes through the fused kernels of `kernels/` (q/k norm + RoPE,
post-norm + residual + next pre-norm, the GELU gate), which run their MLX references off Metal.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import scaled_dot_product_attention

from mlx_gemma4u.kernels import gelu_mul, norm_rope, residual_norm
from mlx_gemma4u.models.config import LayerSpec, TextConfig
from mlx_gemma4u.models.rope import RoPE


class Step:
    """What all layers share during one forward pass.

    offset: the RoPE offset of the first query (int, or (B,) for a left-padded batch). masks: layer
    type, the cache that produced the keys, and the number of keys -> attention mask, computed once
    per type for all the pass's queries. shared: the keys and values that "store" layers hand to
    "reuse" layers, by layer type. After `narrow`, only the last queries go on: the offset moves to
    the first of them and masks keep just their rows.
    """

    def __init__(self, offset, make_mask: Callable):
        self.offset = offset
        self._make_mask = make_mask
        self._masks: dict = {}
        self._rows = 0  # 0: every query; else only the last _rows
        self.shared: dict = {}

    def mask(self, layer_type: str, cache, n_keys: int):
        if layer_type not in self._masks:
            self._masks[layer_type] = self._make_mask(layer_type, cache, n_keys)
        mask = self._masks[layer_type]
        # A string ("causal") is aligned to the last key by MLX, so it holds for any number of last rows.
        return mask[..., -self._rows :, :] if self._rows and isinstance(mask, mx.array) else mask

    def narrow(self, n_queries: int, keep: int) -> None:
        """From here on only the last `keep` of the pass's n_queries queries are computed."""
        self.offset = self.offset + (n_queries - keep)
        self._rows = keep


class RowSteps:
    """One decode pass over B sequences that share nothing but the weights (batched generation).

    steps[i] is row i's own Step (its RoPE offset and masks, from its own caches). Layers batch
    every Linear, MLP, norm and RoPE over the B rows (RoPE at each row's own offset); the cache
    update and attention run row by row (Attention._rows), so a row's cache and mask are exactly
    those of the row decoding alone. One attention call for all rows would first copy every row's
    cached keys and values into one stacked array at every layer and step, and a row padded to
    the longest would sum its softmax in another order than alone, so no longer bit for bit.
    """

    def __init__(self, steps: list[Step]):
        self.steps = steps


def rms_norm_no_scale(x: mx.array, eps: float) -> mx.array:
    return mx.fast.rms_norm(x, None, eps)


class Attention(nn.Module):
    def __init__(self, config: TextConfig, spec: LayerSpec):
        super().__init__()
        dim, bias = config.hidden_size, config.attention_bias
        self.layer_type = spec.layer_type
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, spec.num_kv_heads, spec.head_dim
        self.eps = config.rms_norm_eps
        self.reuse, self.store = spec.kv_mode == "reuse", spec.kv_mode == "store"
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=self.eps)
        if not self.reuse:
            self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=self.eps)
            if not spec.k_eq_v:
                self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=bias)
        self.rope = RoPE(self.head_dim, config.rope_parameters[spec.layer_type])
        self.sdpa = scaled_dot_product_attention  # a backend may swap in its own (backends/)

    def _project_kv(self, x: mx.array, offset) -> tuple[mx.array, mx.array]:
        """(B, T, D) -> keys and values (B, kv_heads, T, head_dim): keys normed and rotated, values
        normed without a scale (on `attention_k_eq_v` layers from the raw key projection)."""
        B, T, _ = x.shape
        raw_k = self.k_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim)
        raw_v = self.v_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim) if "v_proj" in self else raw_k
        k = norm_rope(raw_k, self.k_norm.weight, self.eps, self.rope, offset)
        return k, rms_norm_no_scale(raw_v, self.eps).transpose(0, 2, 1, 3)

    def _queries(self, x: mx.array, offset) -> mx.array:
        """(B, T, D) -> (B, heads, T, head_dim) normed, rotated queries."""
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, self.n_heads, self.head_dim)
        return norm_rope(q, self.q_norm.weight, self.eps, self.rope, offset)

    def _keys_values(self, kv: tuple | None, step: Step, cache):
        """This layer's new keys and values -> (keys, values, cache) to attend to, cached; on a
        "reuse" layer (kv None) those its "store" layer handed over in `step.shared`."""
        if self.reuse:
            return step.shared[self.layer_type]
        k, v = kv if cache is None else cache.update_and_fetch(*kv)
        if self.store:
            step.shared[self.layer_type] = (k, v, cache)
        return k, v, cache

    def _attend(self, q: mx.array, k, v, step: Step, cache) -> mx.array:
        """(B, heads, T, head_dim) queries -> (B, heads, T, head_dim) attention output."""
        mask = step.mask(self.layer_type, cache, (k[0] if isinstance(k, (tuple, list)) else k).shape[2])
        return self.sdpa(q, k, v, cache, scale=1.0, mask=mask)

    def __call__(self, x: mx.array, step: Step | RowSteps, cache=None, keep: int = 0) -> mx.array:
        """(B, T, D) -> (B, T, D), or (B, keep, D) for the last `keep` positions only: keys and values
        still cover all T (and reach the cache), the queries and everything after them do not.

        With RowSteps, `cache` holds one cache per row (None on "reuse" layers) and keep is 0.
        """
        if isinstance(step, RowSteps):
            return self._rows(x, step, cache)
        k, v, cache = self._keys_values(None if self.reuse else self._project_kv(x, step.offset), step, cache)
        if keep:
            step.narrow(x.shape[1], keep)
            x = x[:, -keep:]
        return self.o_proj(_merge_heads(self._attend(self._queries(x, step.offset), k, v, step, cache)))

    def _rows(self, x: mx.array, rows: RowSteps, caches) -> mx.array:
        """B independent sequences, one row each: projections, norms and RoPE run for all rows at
        once (each at its own offset); the cache update, mask and attention per row, against that
        row's own caches only."""
        offsets = mx.array([step.offset for step in rows.steps])
        q = self._queries(x, offsets)
        kv = None if self.reuse else self._project_kv(x, offsets)
        out = []
        for i, (step, cache) in enumerate(zip(rows.steps, caches or [None] * len(rows.steps))):
            row = slice(i, i + 1)
            k, v, cache = self._keys_values(None if kv is None else (kv[0][row], kv[1][row]), step, cache)
            out.append(self._attend(q[row], k, v, step, cache))
        return self.o_proj(_merge_heads(mx.concatenate(out)))


def _merge_heads(x: mx.array) -> mx.array:
    """(B, heads, T, head_dim) -> (B, T, heads * head_dim)."""
    B, _, T, _ = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, -1)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(gelu_mul(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, spec: LayerSpec):
        super().__init__()
        dim, eps = config.hidden_size, config.rms_norm_eps
        self.eps = eps
        self.self_attn = Attention(config, spec)
        self.mlp = MLP(dim, spec.intermediate_size)
        self.input_layernorm = nn.RMSNorm(dim, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(dim, eps=eps)
        self.pre_feedforward_layernorm = nn.RMSNorm(dim, eps=eps)
        self.post_feedforward_layernorm = nn.RMSNorm(dim, eps=eps)
        self.layer_scalar = mx.ones((1,))

    def __call__(self, x: mx.array, step: Step, cache=None) -> mx.array:
        """The layer on its own, x -> x' (TextModel chains `forward` instead)."""
        return self.forward(x, self.input_layernorm(x), self.input_layernorm.weight, step, cache)[0]

    def forward(
        self, x: mx.array, normed: mx.array, next_norm: mx.array, step: Step, cache=None, keep: int = 0
    ) -> tuple[mx.array, mx.array]:
        """x and normed = input_layernorm(x) -> x' and the next norm (weight `next_norm`) of x'
        (for the last `keep` positions only, if keep > 0; see Attention).

        Each post-norm, residual add and following pre-norm is one fused step (kernels.residual_norm),
        so the next layer's input norm is computed here, at the end of this one.
        """
        attn = self.self_attn(normed, step, cache, keep)
        if keep:
            x = x[:, -keep:]
        h, normed = residual_norm(
            x, attn, self.post_attention_layernorm.weight, self.pre_feedforward_layernorm.weight, self.eps, None
        )
        return residual_norm(
            h, self.mlp(normed), self.post_feedforward_layernorm.weight, next_norm, self.eps, self.layer_scalar
        )


class TextModel(nn.Module):
    """Token embedding, the decoder layers, the final norm and the (tied) output head."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, spec) for spec in config.layers]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        owners = [i for i, spec in enumerate(config.layers) if spec.kv_mode != "reuse"]
        self._cache_slot = {layer: slot for slot, layer in enumerate(owners)}
        # the last layer whose keys and values are computed (none in an MTP drafter, draft.py)
        self._last_owner = owners[-1] if owners else None
        self.checkpointed = False  # training: recompute each layer in the backward pass (`recomputed`)
        self.stage = None  # a pipeline stage: this process runs some of the layers (parallel.py)

    def embed(self, input_ids: mx.array) -> mx.array:
        """(B, T) ids -> (B, T, D) embeddings times sqrt(D), the scale rounded to the embeddings' dtype
        (the table's, or its scales' when it is quantized)."""
        h = self.embed_tokens(input_ids)
        return h * mx.array(self.config.hidden_size**0.5, dtype=mx.float32).astype(h.dtype)

    def __call__(self, h: mx.array, step: Step, cache: list | None = None, keep: int = 0) -> mx.array:
        """(B, T, D) input embeddings -> (B, T, D) final-normed hidden states, or (B, keep, D) for
        the last `keep` positions if 0 < keep < T.

        Those positions are cut out in the last layer that computes keys and values, right after
        it has: every layer's keys and values still cover all T tokens (a prefill must fill the
        caches), while that layer's queries, MLP and all later layers run for `keep` positions only.
        With RowSteps (B sequences decoding together), cache[slot] holds one cache per row. On a
        pipeline stage (parallel.py) only this process's layers run: the stream arrives from the
        stage before, and every stage gets the last one's result.
        """
        keep = keep if 0 < keep < h.shape[1] else 0
        n, stage = len(self.layers), self.stage
        first, end = (0, n) if stage is None else (stage.start, stage.end)
        if first > 0:  # a later pipeline stage: the stream arrives from the one before
            if keep and self._last_owner < first:
                step.narrow(h.shape[1], keep)
            h, normed = stage.receive(self._shape_before(first, h.shape, keep), h.dtype)
        else:
            normed = self.layers[0].input_layernorm(h)
        for i in range(first, end):
            layer = self.layers[i]
            next_norm = self.layers[i + 1].input_layernorm.weight if i + 1 < n else self.norm.weight
            slot = self._cache_slot.get(i)
            layer_cache = cache[slot] if cache is not None and slot is not None else None
            if self.checkpointed and cache is None and not keep:
                h, normed = recomputed(layer, h, normed, next_norm, step)
            else:
                h, normed = layer.forward(h, normed, next_norm, step, layer_cache, keep if i == self._last_owner else 0)
        return normed if stage is None else stage.hand_over(h, normed, self._shape_before(n, h.shape, keep))

    def _shape_before(self, i: int, shape: tuple, keep: int) -> tuple:
        """The (B, T, D) shape of the stream entering layer i (or leaving the last, i = L): T is
        `keep` once the layer that cuts the pass to `keep` positions is behind."""
        B, T, D = shape
        return (B, keep if keep and self._last_owner < i else T, D)

    def past(self, cache: list) -> int:
        """Tokens already in `cache`, read from a cache this process fills (a pipeline stage fills
        only its layers')."""
        first = 0 if self.stage is None else self.stage.start
        return cache[min(slot for layer, slot in self._cache_slot.items() if layer >= first)].offset


def recomputed(layer: DecoderLayer, h: mx.array, normed: mx.array, next_norm: mx.array, step: Step) -> tuple:
    """layer.forward (no cache, every position) with its activations recomputed in the backward pass
    instead of kept: gradient checkpointing, one layer's activations alive at a time.

    The layer's trainable parameters are inputs of the checkpoint, so their gradients flow; the
    keys and values a "store" layer hands on are outputs of it, and a "reuse" layer's are inputs.
    """
    attn = layer.self_attn
    kind = attn.layer_type
    handed = step.shared[kind][:2] if attn.reuse else ()

    def run(params, h, normed, next_norm, *kv):
        layer.update(params)
        inner = copy.copy(step)  # the masks are shared; the keys and values handed on are this call's
        inner.shared = {kind: (*kv, None)} if kv else {}
        out = layer.forward(h, normed, next_norm, inner)
        return (*out, *inner.shared[kind][:2]) if attn.store else out

    out = mx.checkpoint(run)(layer.trainable_parameters(), h, normed, next_norm, *handed)
    if attn.store:
        step.shared[kind] = (out[2], out[3], None)
    return out[0], out[1]
