"""The encoder-free vision path: 48x48 pixel patches straight to soft tokens.

For each merged patch p (6,912 values, HWC order, in [0, 1]) at grid position (x, y):

    h = LN2(Dense(LN1(p)))
    h = LNpos(h + T[x, 0] + T[y, 1])          # factorized 2-D position table T (size, 2, dim)
    s = Linear(RMSNormNoScale(h))             # -> decoder width

Positions (-1, -1) mark padding: they add no position embedding and their soft tokens are dropped.
Patches never see each other here; all mixing happens in the decoder. LayerNorms use eps 1e-5.
LN1's statistics over the 6,912 values are reduced in two steps (see multimodal.two_step_mean), its
mean corrected by the mean of the once-centered values; the float32 Dense sums its 6,912 products
in pieces (multimodal.project). Together they keep the float32 soft tokens as close to a float64
result as transformers' float32 ones (tests/models/test_multimodal_parity.py measures the ratio).
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_gemma4u.errors import InputError
from mlx_gemma4u.kernels import position_norm
from mlx_gemma4u.models.config import VisionConfig
from mlx_gemma4u.models.multimodal import MultimodalEmbedder, compute_dtype, kept_rows, project, two_step_mean

LAYER_NORM_EPS = 1e-5
# Patches embedded at a time. Patches never see each other, so this changes no value; it keeps the
# float32 temporaries of LN1 (several copies of 6,912 values per patch) to one slice of the image:
# a 280-patch image at 4 bits on the demo peaked 45 MB above the weights in one go, 17 MB in slices.
PATCH_ROWS = 32


class PatchLayerNorm(nn.LayerNorm):
    """LayerNorm over a whole patch, (..., 6912) -> (..., 6912), with two-pass statistics: the mean,
    then the variance of the centered values (flat patches have a small variance).

    The float32 mean of 6,912 pixels is off by about 3e-7 of the patch's spread, which shifts every
    normalized value by as much (5x torch's error); subtracting the mean of the centered values,
    itself tiny and so almost exact, removes it.
    """

    def __call__(self, x: mx.array) -> mx.array:
        xf = x.astype(mx.float32)
        centered = xf - two_step_mean(xf)
        centered = centered - two_step_mean(centered)
        normed = centered * mx.rsqrt(two_step_mean(centered * centered) + self.eps)
        return (normed * self.weight + self.bias).astype(x.dtype)


class VisionEmbedder(nn.Module):
    def __init__(self, config: VisionConfig, text_hidden_size: int):
        super().__init__()
        self.config = config
        dim = config.mm_embed_dim
        self.patch_ln1 = PatchLayerNorm(config.patch_values, eps=LAYER_NORM_EPS)
        self.patch_dense = nn.Linear(config.patch_values, dim)
        self.patch_ln2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.pos_embedding = mx.zeros((config.mm_posemb_size, 2, dim))
        self.pos_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.multimodal_embedder = MultimodalEmbedder(dim, text_hidden_size, config.rms_norm_eps)

    def __call__(self, pixel_values: mx.array, position_ids: mx.array) -> mx.array:
        """(N, P, 6912) patches and (N, P, 2) positions -> (M, D) soft tokens of the M real patches."""
        positions = np.array(position_ids)
        self._check(pixel_values, positions)
        values = pixel_values.reshape(1, -1, pixel_values.shape[-1])
        ids = position_ids.reshape(1, -1, 2)
        soft = [
            self._embed(values[:, i : i + PATCH_ROWS], ids[:, i : i + PATCH_ROWS])
            for i in range(0, values.shape[1], PATCH_ROWS)
        ]
        return kept_rows(mx.concatenate(soft, axis=1), np.all(positions != -1, axis=-1))

    def _embed(self, pixel_values: mx.array, position_ids: mx.array) -> mx.array:
        """(1, m, 6912) patches and (1, m, 2) positions -> (1, m, D) soft tokens, padding included."""
        dtype = compute_dtype(self.patch_dense)
        h = self.patch_ln2(project(self.patch_dense, self.patch_ln1(pixel_values.astype(dtype)), dtype))
        norm = self.pos_norm
        h = position_norm(h, self.pos_embedding, position_ids, norm.weight, norm.bias, norm.eps)
        return self.multimodal_embedder(h)

    def _check(self, pixel_values: mx.array, positions: np.ndarray) -> None:
        values = self.config.patch_values
        if pixel_values.ndim != 3 or pixel_values.shape[-1] != values:
            raise InputError(
                f"pixel_values must have shape (images, patches, {values}), got {tuple(pixel_values.shape)}."
            )
        if not mx.issubdtype(pixel_values.dtype, mx.floating):
            raise InputError(
                f"pixel_values must be floating point (pixels scaled to [0, 1]), got {pixel_values.dtype}."
            )
        if positions.shape != (*pixel_values.shape[:2], 2):
            raise InputError(
                f"position ids must have shape {(*pixel_values.shape[:2], 2)} to match pixel_values, "
                f"got {positions.shape}."
            )
        size = self.config.mm_posemb_size
        if positions.min(initial=0) < -1 or positions.max(initial=0) >= size:
            raise InputError(
                f"patch positions must lie in [0, {size}) (or be -1 for padding); "
                f"got values from {positions.min()} to {positions.max()}."
            )
