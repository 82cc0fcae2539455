"""The MLP's gate: gelu_tanh(gate) * up, elementwise over (..., intermediate) activations.

Every layer runs it on B*T*15360 values (30720 on double-wide layers). Unfused, MLX runs
gelu_approx (itself one compiled kernel: read g, write a) and the multiply (read a, u, write out):
5 transfers and 2 launches. Fused: read g, u, write out, 1 launch. `mx.compile` already gives the
reference that fusion (one generated kernel, bit-identical to the unfused ops on CPU), so the
custom kernel can at best match it; it is here so the benchmark can show which is faster on a Mac.
benchmarks/kernels.py measures both.

Kernel: one thread per element, GELU in float32.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn

from mlx_gemma4u.kernels.dispatch import FLOATS, Kernel, metal_kernel, normal

SOURCE = """
    uint i = thread_position_in_grid.x;
    float g = float(gate[i]);
    float inner = 0.7978845608028654f * (g + 0.044715f * g * g * g);
    float act = 0.5f * g * (1.0f + metal::precise::tanh(inner));
    out[i] = T(float(T(act)) * float(up[i]));
"""


@partial(mx.compile, shapeless=True)
def reference(gate: mx.array, up: mx.array) -> mx.array:
    return nn.gelu_approx(gate) * up


def supports(gate, up) -> bool:
    return gate.dtype in FLOATS and up.dtype == gate.dtype and gate.shape == up.shape and gate.size < 2**32


def sample(gate, up) -> tuple:
    D, dt = gate.shape[-1], gate.dtype
    return normal((2, 3, D), dt, 1) * 3, normal((2, 3, D), dt, 2)


def build():
    kernel = metal_kernel("gelu_mul", ["gate", "up"], ["out"], SOURCE)

    def run(gate, up):
        return kernel(
            inputs=[gate, up],
            template=[("T", gate.dtype)],
            grid=(gate.size, 1, 1),
            threadgroup=(256, 1, 1),
            output_shapes=[gate.shape],
            output_dtypes=[gate.dtype],
        )[0]

    return run


gelu_mul = Kernel("gelu_mul", reference, build, supports, sample)
