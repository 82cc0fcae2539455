"""KV caches: mlx-lm's `KVCache` for full layers and `RotatingKVCache` for sliding layers.

A sliding layer never needs more than its window: the rotating cache keeps the last W - 1 tokens
(a query then sees W keys, itself included), exactly like transformers' sliding cache. Layers that
reuse another layer's keys and values (KV sharing) get no cache at all.

Masks need to know which absolute position each returned key holds; `key_positions` reads that
off the cache, including the rotated order of a full rotating buffer.
"""

import mlx.core as mx
from mlx_lm.models.cache import KVCache, RotatingKVCache

from .config import SLIDING, TextConfig


def make_cache(config: TextConfig) -> list:
    """One cache per layer that owns keys and values, in layer order."""
    return [
        RotatingKVCache(max_size=config.sliding_window) if spec.layer_type == SLIDING else KVCache()
        for spec in config.layers
        if spec.kv_mode != "reuse"
    ]


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
