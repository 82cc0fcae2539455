"""Post-norm, residual add, layer scalar and the next pre-norm in one pass over a row.

    h = (x + rms_norm(y, w_post)) * scale        scale: the layer scalar after the MLP, else None
    n = rms_norm(h, w_next)                       the next block's input: pre-MLP or next layer's norm

Every layer runs this twice (after attention and after the MLP), 96 times a token on the 12B
(D = 3840). Unfused, MLX runs 3-4 kernels: rms_norm (read y, write t), add (read x, t, write h),
the scalar multiply (read h, write h'), rms_norm (read h', write n): 9 row-sized transfers. Fused:
read x, y, write h, n (and h read back from cache by the thread that wrote it): 4 transfers and one
launch. Decoding (one row) is launch-bound: 5 launches fewer per layer, 240 a token. Prefill is
memory-bound: about 2x less traffic for this step (benchmarks/kernels.py measures both).

The reference is the plain ops, not compiled: `mx.compile` fuses the add and the scalar multiply
(bit-identical on CPU) but then holds on to buffers the plain ops hand on to the next op, which
raised the peak of a 512-token prefill on the mid benchmark checkpoint by 6 MB (818.5 against
812.2 MB), above mlx-vlm's.

Kernel: one threadgroup per row (`row_threads`), two threadgroup reductions (sum of y^2, then of
h^2). Values are rounded to the dtype where MLX's ops round (normed value, product with the
weight, sum, scalar product), so low-precision results track the reference.
"""

from __future__ import annotations

import mlx.core as mx

from mlx_gemma4u.kernels.dispatch import FLOATS, ROW_SUM, Kernel, metal_kernel, normal, row_threads

SOURCE = """
    uint row = threadgroup_position_in_grid.x;
    uint tid = thread_position_in_threadgroup.x;
    threadgroup float partial[TG / 32];
    size_t base = size_t(row) * D;
    float ss = 0.0f;
    for (int i = tid; i < D; i += TG) { float v = float(y[base + i]); ss += v * v; }
    float r = metal::precise::rsqrt(row_sum<TG>(ss, partial, thread_index_in_simdgroup,
                                                simdgroup_index_in_threadgroup) / D + eps);
    float s = float(scale[0]);
    ss = 0.0f;
    for (int i = tid; i < D; i += TG) {
        T normed = T(float(T(float(y[base + i]) * r)) * float(w_post[i]));
        T hv = T(float(T(float(x[base + i]) + float(normed))) * s);
        h[base + i] = hv;
        ss += float(hv) * float(hv);
    }
    r = metal::precise::rsqrt(row_sum<TG>(ss, partial, thread_index_in_simdgroup,
                                          simdgroup_index_in_threadgroup) / D + eps);
    for (int i = tid; i < D; i += TG) {
        n[base + i] = T(float(T(float(h[base + i]) * r)) * float(w_next[i]));
    }
"""


def reference(
    x: mx.array, y: mx.array, w_post: mx.array, w_next: mx.array, eps: float, scale: mx.array | None
) -> tuple[mx.array, mx.array]:
    h = x + mx.fast.rms_norm(y, w_post, eps)
    if scale is not None:
        h = h * scale
    return h, mx.fast.rms_norm(h, w_next, eps)


def supports(x, y, w_post, w_next, eps, scale) -> bool:
    D = x.shape[-1]
    return (
        x.dtype in FLOATS
        and x.shape == y.shape
        and w_post.shape == w_next.shape == (D,)
        and all(a.dtype == x.dtype for a in (y, w_post, w_next))
        and (scale is None or (scale.size == 1 and scale.dtype == x.dtype))
    )


def sample(x, y, w_post, w_next, eps, scale) -> tuple:
    D, dt = x.shape[-1], x.dtype
    return (
        normal((2, 3, D), dt, 1),
        normal((2, 3, D), dt, 2),
        normal((D,), dt, 3),
        normal((D,), dt, 4),
        eps,
        None if scale is None else normal((1,), dt, 5),
    )


def build():
    kernel = metal_kernel(
        "residual_norm", ["x", "y", "w_post", "w_next", "eps", "scale"], ["h", "n"], SOURCE, header=ROW_SUM
    )

    def run(x, y, w_post, w_next, eps, scale):
        D = x.shape[-1]
        rows, tg = x.size // D, row_threads(D)
        factor = mx.ones((1,), x.dtype) if scale is None else scale.reshape(1)
        return tuple(
            kernel(
                inputs=[x, y, w_post, w_next, mx.array(eps, mx.float32), factor],
                template=[("T", x.dtype), ("D", D), ("TG", tg)],
                grid=(rows * tg, 1, 1),
                threadgroup=(tg, 1, 1),
                output_shapes=[x.shape, x.shape],
                output_dtypes=[x.dtype, x.dtype],
            )
        )

    return run


residual_norm = Kernel("residual_norm", reference, build, supports, sample)
