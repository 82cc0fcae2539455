"""The vision path's position embedding and its LayerNorm in one pass over each patch row.

    out = layer_norm(h + T[x, 0] * (x != -1) + T[y, 1] * (y != -1), weight, bias)

for (N, P, dim) patch features h, (N, P, 2) positions (x, y) and the (size, 2, dim) table T. It runs
once per patch (280 per image at the default budget, dim 3840), so it matters for prefill of
images and video. Unfused, MLX runs two gathers, two masking multiplies, two adds and layer_norm:
about 7 launches and 15 row-sized transfers. Fused: read h and two table rows, write out: 4
transfers, 1 launch (benchmarks/kernels.py measures both).

Kernel: one threadgroup per patch; the sum is written to `out` first and read back by the same
thread for the mean, the variance of the centered values, and the normalized output.
"""

from __future__ import annotations

import mlx.core as mx

from mlx_gemma4u.kernels.dispatch import FLOATS, ROW_SUM, Kernel, metal_kernel, normal, row_threads

SOURCE = """
    uint row = threadgroup_position_in_grid.x;
    uint tid = thread_position_in_threadgroup.x;
    threadgroup float partial[TG / 32];
    int px = positions[2 * row], py = positions[2 * row + 1];
    size_t base = size_t(row) * D;
    float sum = 0.0f;
    for (int i = tid; i < D; i += TG) {
        float ex = px >= 0 ? float(table[(size_t(px) * 2) * D + i]) : 0.0f;
        float ey = py >= 0 ? float(table[(size_t(py) * 2 + 1) * D + i]) : 0.0f;
        T v = T(float(h[base + i]) + float(T(ex + ey)));
        out[base + i] = v;
        sum += float(v);
    }
    float mean = row_sum<TG>(sum, partial, thread_index_in_simdgroup, simdgroup_index_in_threadgroup) / D;
    float ss = 0.0f;
    for (int i = tid; i < D; i += TG) { float c = float(out[base + i]) - mean; ss += c * c; }
    float r = metal::precise::rsqrt(
        row_sum<TG>(ss, partial, thread_index_in_simdgroup, simdgroup_index_in_threadgroup) / D + eps);
    for (int i = tid; i < D; i += TG) {
        T normed = T((float(out[base + i]) - mean) * r);
        out[base + i] = T(float(T(float(normed) * float(weight[i]))) + float(bias[i]));
    }
"""


def reference(
    h: mx.array, table: mx.array, positions: mx.array, weight: mx.array, bias: mx.array, eps: float
) -> mx.array:
    valid = (positions != -1)[..., None].astype(table.dtype)
    clamped = mx.maximum(positions, 0)
    embedded = table[clamped[..., 0], 0] * valid[..., 0, :] + table[clamped[..., 1], 1] * valid[..., 1, :]
    return mx.fast.layer_norm(h + embedded, weight, bias, eps)


def supports(h, table, positions, weight, bias, eps) -> bool:
    D = h.shape[-1]
    return (
        h.dtype in FLOATS
        and h.ndim == 3
        and positions.shape == (*h.shape[:2], 2)
        and table.ndim == 3
        and table.shape[1:] == (2, D)
        and weight.shape == bias.shape == (D,)
        and all(a.dtype == h.dtype for a in (table, weight, bias))
    )


def sample(h, table, positions, weight, bias, eps) -> tuple:
    D, dt = h.shape[-1], h.dtype
    return (
        normal((2, 3, D), dt, 1),
        normal((4, 2, D), dt, 2),
        mx.array([[[0, 1], [3, 2], [-1, -1]]] * 2),
        normal((D,), dt, 3),
        normal((D,), dt, 4),
        eps,
    )


def build():
    kernel = metal_kernel(
        "position_norm", ["h", "table", "positions", "weight", "bias", "eps"], ["out"], SOURCE, header=ROW_SUM
    )

    def run(h, table, positions, weight, bias, eps):
        D = h.shape[-1]
        rows, tg = h.size // D, row_threads(D)
        return kernel(
            inputs=[h, table, positions.astype(mx.int32), weight, bias, mx.array(eps, mx.float32)],
            template=[("T", h.dtype), ("D", D), ("TG", tg)],
            grid=(rows * tg, 1, 1),
            threadgroup=(tg, 1, 1),
            output_shapes=[h.shape],
            output_dtypes=[h.dtype],
        )[0]

    return run


position_norm = Kernel("position_norm", reference, build, supports, sample)
