"""The vision grid shared by images and video frames: budgets, target size, 48x48 patch rows.

The model sees an image as merged patches of 48x48 pixels (16x16 patches pooled 3x3). A patch row
holds the 48x48x3 block in plain HWC order (index (r*48 + c)*3 + channel), rows run in raster
order over the merged grid, and each row's position is (x, y) = (column, row). Rows past the
image's own patches are zeros with position (-1, -1), up to the soft-token budget.
"""

from __future__ import annotations

import math

import numpy as np

from mlx_gemma4u.errors import InputError

SUPPORTED_BUDGETS = (70, 140, 280, 560, 1120)
PATCH_SIZE = 16
POOLING_KERNEL = 3
MERGED_SIDE = PATCH_SIZE * POOLING_KERNEL  # 48 pixels per merged patch side
PATCH_VALUES = MERGED_SIDE * MERGED_SIDE * 3  # 6912


def check_budget(max_soft_tokens: object, name: str = "max_soft_tokens") -> int:
    """Return the budget if it is one the model was trained with, else raise InputError."""
    if max_soft_tokens not in SUPPORTED_BUDGETS:
        raise InputError(f"{name}={max_soft_tokens!r} is not supported; use one of {SUPPORTED_BUDGETS}.")
    return int(max_soft_tokens)


def target_size(height: int, width: int, max_soft_tokens: int) -> tuple[int, int]:
    """The (height, width), multiples of 48, an image is resized to for a soft-token budget.

    The largest aspect-preserving size with at most `max_soft_tokens` merged patches; small images
    are scaled up. A side that rounds to zero becomes one patch, and the other side then follows
    the raw aspect ratio, capped at `max_soft_tokens` patches (transformers' rule for thin images).
    """
    if height <= 0 or width <= 0:
        raise InputError(f"An image of {height}x{width} pixels has no content; pass a non-empty image.")
    budget_pixels = max_soft_tokens * POOLING_KERNEL**2 * PATCH_SIZE**2
    factor = math.sqrt(budget_pixels / (height * width))
    target_h = math.floor(factor * height / MERGED_SIDE) * MERGED_SIDE
    target_w = math.floor(factor * width / MERGED_SIDE) * MERGED_SIDE
    longest = max_soft_tokens * MERGED_SIDE
    if target_h == 0:
        target_h, target_w = MERGED_SIDE, min(math.floor(width / height) * MERGED_SIDE, longest)
    elif target_w == 0:
        target_h, target_w = min(math.floor(height / width) * MERGED_SIDE, longest), MERGED_SIDE
    return target_h, target_w


def patchify(pixels: np.ndarray, max_soft_tokens: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Cut an (H, W, 3) float32 image (H, W multiples of 48) into padded patch rows.

    Returns pixel rows (max_soft_tokens, 6912) float32, positions (max_soft_tokens, 2) int64 as
    (x, y) with (-1, -1) padding, and the number of real patches.
    """
    rows_y, cols_x = pixels.shape[0] // MERGED_SIDE, pixels.shape[1] // MERGED_SIDE
    count = rows_y * cols_x
    blocks = pixels.reshape(rows_y, MERGED_SIDE, cols_x, MERGED_SIDE, 3).transpose(0, 2, 1, 3, 4)
    rows = np.zeros((max_soft_tokens, PATCH_VALUES), dtype=np.float32)
    rows[:count] = blocks.reshape(count, PATCH_VALUES)
    positions = np.full((max_soft_tokens, 2), -1, dtype=np.int64)
    grid = np.arange(count)
    positions[:count, 0] = grid % cols_x
    positions[:count, 1] = grid // cols_x
    return rows, positions, count
