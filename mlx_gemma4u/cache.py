"""KV caches: mlx-lm's `KVCache` for full layers and `RotatingKVCache` for sliding layers.

A sliding layer's query sees the last W keys (itself included). Its rotating cache holds W plus
`rewind_room` (another W) more tokens, so a conversation can take back up to that many tokens even
after the buffer wrapped: when the next turn's prompt re-renders the last reply differently from the
tokens that were generated (the chat template trims it, drops the thinking), the cache rewinds to
where they part instead of starting over. The masks hide keys older than the window. Layers that
reuse another layer's keys and values (KV sharing) get no cache at all.

Masks need to know which absolute position each returned key holds; `key_positions` reads that
off the cache, including the rotated order of a full rotating buffer.

`PromptCache` is a conversation's caches plus the tokens they hold, carried from turn to turn.
"""

import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, RotatingKVCache, load_prompt_cache, save_prompt_cache

from .config import SLIDING, TextConfig
from .errors import InputError
from .files import replacing


def make_cache(config: TextConfig) -> list:
    """One cache per layer that owns keys and values, in layer order."""
    return [
        RotatingKVCache(max_size=config.sliding_window + rewind_room(config)) if spec.layer_type == SLIDING
        else KVCache()
        for spec in config.layers
        if spec.kv_mode != "reuse"
    ]


def rewind_room(config: TextConfig) -> int:
    """Tokens a wrapped sliding cache can take back: one window's worth."""
    return config.sliding_window


def can_rewind(cache, n: int, config: TextConfig) -> bool:
    if isinstance(cache, RotatingKVCache) and cache.offset >= cache.max_size:
        return n <= cache.max_size - config.sliding_window
    return cache.is_trimmable()


def rewind(cache, n: int) -> None:
    """Forget the last n tokens (check `can_rewind` first).

    A wrapped rotating buffer is laid out in time order, cut, and padded at the old end back to
    its full size: the padding sits at positions older than any future query's window.
    """
    if not (isinstance(cache, RotatingKVCache) and cache.offset >= cache.max_size):
        cache.trim(n)
        return
    size = cache.max_size
    kept_k = cache._temporal_order(cache.keys)[..., : -n or None, :][..., -size:, :]
    kept_v = cache._temporal_order(cache.values)[..., : -n or None, :][..., -size:, :]
    pad = [(0, 0)] * 2 + [(size - kept_k.shape[2], 0), (0, 0)]
    cache.keys, cache.values = mx.pad(kept_k, pad), mx.pad(kept_v, pad)
    cache.offset -= n
    cache._idx = size


def key_positions(cache, n_keys: int) -> mx.array:
    """Absolute positions (n_keys,) of the keys the cache just returned from `update_and_fetch`.

    A rotating buffer that has wrapped holds position `offset - idx + j` in slot j < idx and one
    window earlier in the slots after it; an unwrapped cache holds the last n_keys positions in order.
    """
    end = cache.offset
    idx = getattr(cache, "_idx", n_keys)
    slots = mx.arange(n_keys)
    positions = end - idx + slots
    if isinstance(cache, RotatingKVCache) and idx < n_keys:
        positions = mx.where(slots >= idx, positions - cache.max_size, positions)
    return positions


class PromptCache:
    """A conversation's KV caches and the tokens they hold, so turn N+1 prefills only its new tokens."""

    def __init__(self, model, kv_bits: int | None = None):
        self.config = model.config.text
        self._fresh = model.make_cache
        self.caches = model.make_cache()
        self.tokens: list[int] = []
        self.kv_bits = kv_bits
        self.reused = 0  # tokens of the last prompt that were already cached

    def reusable(self, ids: list[int], blocks: np.ndarray) -> int:
        """How many leading tokens of `ids` can stay cached: the common prefix, short of the last
        token (its logits are needed), never ending inside a vision block, and only if the caches
        can be trimmed back to it."""
        n = 0
        for a, b in zip(self.tokens, ids[:-1]):
            if a != b:
                break
            n += 1
        while 0 < n < len(ids) and blocks[n] >= 0 and blocks[n] == blocks[n - 1]:
            n -= 1
        surplus = len(self.tokens) - n
        if surplus and not all(can_rewind(c, surplus, self.config) for c in self.caches):
            return 0
        return n

    def keep(self, n: int) -> None:
        """Drop everything after the first n cached tokens (all of it when n is 0)."""
        if n == 0:
            self.caches, self.tokens = self._fresh(), []
            return
        for c in self.caches:
            rewind(c, len(self.tokens) - n)
        self.tokens = self.tokens[:n]

    def quantize(self) -> None:
        """Quantize the full-attention caches to kv_bits, if set (mlx-lm cannot quantize rotating ones)."""
        if self.kv_bits is None:
            return
        self.caches = [
            c.to_quantized(group_size=64 if c.keys.shape[-1] % 64 == 0 else 32, bits=self.kv_bits)
            if isinstance(c, KVCache) and c.keys is not None else c
            for c in self.caches
        ]

    def save(self, path: str | os.PathLike) -> None:
        """Write the caches and their tokens to a safetensors file, atomically."""
        with replacing(Path(path)) as tmp:
            save_prompt_cache(str(tmp), self.caches, {"tokens": json.dumps(self.tokens)})

    @classmethod
    def load(cls, path: str | os.PathLike, model) -> "PromptCache":
        caches, metadata = load_prompt_cache(str(path), return_metadata=True)
        cache = cls(model)
        if len(caches) != len(cache.caches):
            raise InputError(f"{path} holds a prompt cache for a different model.")
        cache.caches, cache.tokens = caches, json.loads(metadata["tokens"])
        return cache
