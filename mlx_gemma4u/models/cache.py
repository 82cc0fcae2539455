"""KV caches: mlx-lm's `KVCache` for full layers and `RotatingKVCache` for sliding layers.

A sliding layer's query sees the last W keys (itself included). Its rotating cache holds W plus
`rewind_room` (another W) more tokens, so a conversation can take back up to that many tokens even
after the buffer wrapped (the next turn's prompt may re-render the last reply differently from the
tokens generated). The masks hide keys older than the window. Layers that reuse another layer's
keys and values (KV sharing) get no cache at all. `key_positions` says which absolute position
each returned key holds, including the rotated order of a full rotating buffer.
"""

import mlx.core as mx
from mlx_lm.models.cache import KVCache, RotatingKVCache

from mlx_gemma4u.models.config import SLIDING, TextConfig


def make_cache(config: TextConfig) -> list:
    """One cache per layer that owns keys and values, in layer order."""
    return [
        RotatingKVCache(max_size=config.sliding_window + rewind_room(config))
        if spec.layer_type == SLIDING
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
