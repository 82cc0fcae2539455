"""Rotary position embeddings for the two layer types.

Sliding layers use ordinary RoPE over the whole head. Full layers use "proportional" RoPE: only the
first `int(p * d / 2)` frequency pairs rotate, with exponents computed over the *full* head dim d,
and the other pairs stay still. With the rotate-half layout that means dims j and j + d/2 rotate
for j < p*d/2 — not "rotate the first p*d dims", so `mx.fast.rope(x, p*d)` would be wrong. Passing
explicit periods, infinite for the still pairs, to `mx.fast.rope` gives exactly that.
"""

import mlx.core as mx
import mlx.nn as nn


class RoPE(nn.Module):
    """Applies RoPE to (B, heads, T, head_dim) at positions offset + arange(T).

    `offset` is an int, or a (B,) array when rows of a left-padded batch start at different positions.
    """

    def __init__(self, head_dim: int, params: dict):
        super().__init__()
        self.head_dim = head_dim
        theta = float(params["rope_theta"])
        if params.get("rope_type", "default") == "proportional":
            n_rot = int(params.get("partial_rotary_factor", 1.0) * head_dim // 2)
            exponents = mx.arange(0, 2 * n_rot, 2, dtype=mx.float32) / head_dim
            rotating = float(params.get("factor", 1.0)) * theta**exponents
            still = mx.full((head_dim // 2 - n_rot,), mx.inf, dtype=mx.float32)
            self._periods = mx.concatenate([rotating, still])
            self._base = None
        else:
            self._periods = None
            self._base = theta
        # The same angles for kernels that rotate by themselves: 0 for still pairs.
        self._inverse_frequencies = (
            1.0 / self._periods
            if self._periods is not None
            else theta ** -(mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim)
        )

    def __call__(self, x: mx.array, offset) -> mx.array:
        return mx.fast.rope(
            x, self.head_dim, traditional=False, base=self._base, scale=1.0, offset=offset, freqs=self._periods
        )

    def inverse_frequencies(self) -> mx.array:
        """(head_dim / 2,) float32: the angle per position of each pair (j, j + head_dim / 2)."""
        return self._inverse_frequencies
