"""The final logit soft-capping, cap * tanh(logits / cap), the last step before sampling.

It runs once a token over the whole vocabulary (262,144 logits a row). Unfused, MLX runs divide,
tanh and multiply: 3 launches and 6 vocabulary-sized transfers. Fused: read once, write once.
`mx.compile` gives the reference that same single pass (bit-identical to the unfused ops on CPU),
so the custom kernel can at best match it; benchmarks/kernels.py decides.

Kernel: one thread per logit, tanh in float32.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx

from mlx_gemma4u.kernels.dispatch import FLOATS, Kernel, metal_kernel, normal

SOURCE = """
    uint i = thread_position_in_grid.x;
    out[i] = T(metal::precise::tanh(float(x[i]) / cap) * cap);
"""


@partial(mx.compile, shapeless=True)
def _capped(x: mx.array, cap: mx.array) -> mx.array:
    return mx.tanh(x / cap) * cap


def reference(x: mx.array, cap: float) -> mx.array:
    return _capped(x, mx.array(cap, x.dtype))


def supports(x, cap) -> bool:
    return x.dtype in FLOATS and x.size < 2**32


def sample(x, cap) -> tuple:
    return normal((2, 3, x.shape[-1]), x.dtype, 1) * (2 * cap), cap


def build():
    kernel = metal_kernel("softcap", ["x", "cap"], ["out"], SOURCE)

    def run(x, cap):
        return kernel(
            inputs=[x, mx.array(cap, mx.float32)],
            template=[("T", x.dtype)],
            grid=(x.size, 1, 1),
            threadgroup=(256, 1, 1),
            output_shapes=[x.shape],
            output_dtypes=[x.dtype],
        )[0]

    return run


softcap = Kernel("softcap", reference, build, supports, sample)
