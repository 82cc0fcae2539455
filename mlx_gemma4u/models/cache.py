"""KV caches: mlx-lm's `KVCache` for full layers and `SlidingKVCache` for sliding layers.

A sliding layer's query sees the last W keys (itself included), so a decode step attends to
exactly W keys. The cache keeps more than that, `rewind_room` tokens more, so a conversation can
take back tokens after the window has moved on (a rejected draft; a next turn whose prompt
re-renders the last reply differently from the tokens generated). It keeps them in time order in
one buffer, so the keys a step attends to are always one contiguous slice of it, never a copy.
Layers that reuse another layer's keys and values (KV sharing) get no cache at all.
"""

import mlx.core as mx
from mlx_lm.models.cache import KVCache, _BaseCache

from mlx_gemma4u.models.config import SLIDING, TextConfig


class SlidingKVCache(_BaseCache):
    """The keys and values of one sliding layer: (B, kv_heads, T, head_dim) in, in time order.

    The buffer holds at most `window + room` tokens. When it is full the oldest `room // 8` (at
    least one) are dropped together and the rest move to the front, one copy per that many tokens,
    so at least `room - room // 8` tokens can always be taken back (`can_rewind` says exactly).
    """

    step = 256

    def __init__(self, window: int, room: int):
        self.window, self.room = window, room
        self.keys = self.values = None
        self.offset = 0  # tokens seen
        self.start = 0  # the position of the buffer's first slot

    @property
    def held(self) -> int:
        return self.offset - self.start

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append T tokens -> the keys and values the T new queries can see: the W - 1 before
        them and themselves (a decode step: exactly W), a view of the buffer."""
        T, end = keys.shape[2], self.held + keys.shape[2]
        if self.keys is None or end > self.keys.shape[2]:
            self._make_room(keys, values)
            end = self.held + T
        self.keys[..., end - T : end, :] = keys
        self.values[..., end - T : end, :] = values
        self.offset += T
        first = max(0, end - (self.window - 1 + T))
        return self.keys[..., first:end, :], self.values[..., first:end, :]

    def _make_room(self, keys: mx.array, values: mx.array) -> None:
        """Room for T more tokens: the buffer grows 256 slots at a time up to window + room; once
        that is full, the oldest tokens are dropped (a batch of them, keeping the W - 1 the new
        queries need) and the rest move to the front. A prompt chunk longer than the room gets a
        buffer of its own length."""
        T, size = keys.shape[2], self.window + self.room
        keep = self.held
        if keep + T > size:
            keep = min(keep, size - max(1, self.room // 8), max(size - T, self.window - 1))
            length = max(size, keep + T)
        else:
            length = min(size, -(-(keep + T) // self.step) * self.step)

        def moved(old: mx.array | None, new: mx.array) -> mx.array:
            fresh = mx.zeros((*new.shape[:2], length - keep, new.shape[3]), new.dtype)
            return fresh if not keep else mx.concatenate([old[..., self.held - keep : self.held, :], fresh], axis=2)

        self.keys, self.values = moved(self.keys, keys), moved(self.values, values)
        self.start = self.offset - keep

    def keys_and_values(self, last: int | None = None) -> tuple[mx.array, mx.array]:
        """The newest `last` cached keys and values (all held if None), a view in time order."""
        first = 0 if last is None else max(0, self.held - last)
        return self.keys[..., first : self.held, :], self.values[..., first : self.held, :]

    def can_rewind(self, n: int) -> bool:
        """Whether the last n tokens can be taken back: the next query still finds its W - 1 keys. An
        empty cache (a layer another pipeline stage runs) has nothing to take back."""
        if self.offset == 0:
            return True
        return n <= self.offset if self.start == 0 else n <= self.held - self.window + 1

    def trim(self, n: int) -> int:
        n = min(n, self.held)
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        """Bytes the buffer holds (the server's KV-memory metric reads it)."""
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    @property
    def state(self):
        keys, values = (None, None) if self.keys is None else self.keys_and_values()
        return keys, values, self.offset, self.window, self.room

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset, self.window, self.room = v
        self.start = self.offset - (0 if self.keys is None else self.keys.shape[2])


def make_cache(config: TextConfig) -> list:
    """One cache per layer that owns keys and values, in layer order."""
    return [
        SlidingKVCache(config.sliding_window, rewind_room(config)) if spec.layer_type == SLIDING else KVCache()
        for spec in config.layers
        if spec.kv_mode != "reuse"
    ]


def rewind_room(config: TextConfig) -> int:
    """Tokens a sliding cache keeps beyond its window, to take back: one window's worth."""
    return config.sliding_window


def can_rewind(cache, n: int) -> bool:
    return cache.can_rewind(n) if isinstance(cache, SlidingKVCache) else cache.is_trimmable()


def rewind(cache, n: int) -> None:
    """Forget the last n tokens (check `can_rewind` first)."""
    cache.trim(n)
