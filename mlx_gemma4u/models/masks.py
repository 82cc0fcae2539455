"""Attention masks of the unified model.

Tokens of one image, or one video frame, form a *block* and see each other both ways; everything
else is causal, and sliding layers also cut at the window. transformers 5.23 has two definitions,
both offered here:

    semantics     full layers          sliding layers
    "gemma4"      causal               (causal OR same block) AND in window
    "hf-forward"  causal OR same block (causal AND in window) OR same block

"gemma4" is the design of Gemma 4 (transformers' `create_masks_for_generate`, vLLM); "hf-forward"
is what transformers' plain `model(**inputs)` computes. Padded keys are always hidden.
"""

import mlx.core as mx

from mlx_gemma4u.models.config import SLIDING

SEMANTICS = ("gemma4", "hf-forward")


def vision_blocks(mm_token_type_ids: mx.array) -> mx.array:
    """(B, T) block id of each token: maximal runs of image/video tokens (types 1, 2) numbered
    0, 1, 2... per row; -1 for text and audio."""
    vision = (mm_token_type_ids == 1) | (mm_token_type_ids == 2)
    previous = mx.pad(vision[:, :-1], [(0, 0), (1, 0)])
    starts = vision & ~previous
    ids = mx.cumsum(starts.astype(mx.int32), axis=1) - 1
    return mx.where(vision, ids, -1)


def build_mask(
    layer_type: str,
    semantics: str,
    window: int,
    q_pos: mx.array,
    k_pos: mx.array,
    q_blocks: mx.array | None = None,
    k_blocks: mx.array | None = None,
    key_valid: mx.array | None = None,
) -> mx.array:
    """Boolean mask (B or 1, 1, T, K): may query i (at q_pos[i]) see key j (at k_pos[j])?

    q_blocks (B, T) / k_blocks (B, K) are block ids (-1 = none); key_valid (B, K) hides padding.
    """
    q, k = q_pos[:, None], k_pos[None, :]
    causal = k <= q
    in_window = k > q - window
    if q_blocks is None:
        same = mx.array(False)
    else:
        same = (q_blocks[:, :, None] == k_blocks[:, None, :]) & (q_blocks[:, :, None] >= 0)
    if layer_type == SLIDING:
        mask = (causal | same) & in_window if semantics == "gemma4" else (causal & in_window) | same
    else:
        mask = causal | same if semantics == "hf-forward" else causal
    if key_valid is not None:
        # A padded query still sees itself, so no row is empty (an empty row would give NaNs).
        mask = (mask & key_valid[:, None, :]) | (k == q)
    return mask.reshape(-1, 1, *mask.shape[-2:])
