"""Anti-aliased bicubic resize of uint8 images, equal bit for bit to torch's uint8 CPU kernel.

transformers resizes with torchvision (`resize(..., BICUBIC, antialias=True)`) on the uint8 image.
On CPU that kernel is Pillow's separable convolution, but with the filter weights quantised to
int16 at a precision chosen from the largest weight (Pillow itself uses 22 fixed bits), so
Pillow's `Image.resize` differs from it by up to 2/255. Re-creating the int16 arithmetic here
gives identical pixels on every golden image.

Shapes: (H, W, C) uint8 in, (height, width, C) uint8 out. The width pass runs first and its
result is rounded to uint8 before the height pass, as in the kernel.
"""

from __future__ import annotations

import math

import numpy as np

_CUBIC_A = -0.5  # Keys' bicubic kernel, as Pillow and torch use for anti-aliased resizing
_CUBIC_SUPPORT = 2.0
_MAX_WEIGHT_BITS = 22
_INT16_LIMIT = 1 << 15


def resize_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an (H, W, C) uint8 image to (height, width, C); axes already at size are left alone."""
    if image.shape[1] != width:
        image = _resize_axis(image, axis=1, out_size=width)
    if image.shape[0] != height:
        image = _resize_axis(image, axis=0, out_size=height)
    return image


def _cubic(x: np.ndarray) -> np.ndarray:
    a = _CUBIC_A
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _filter_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and float64 weights, both (out_size, taps), of the anti-aliased bicubic filter."""
    scale = in_size / out_size
    support = _CUBIC_SUPPORT * scale if scale >= 1.0 else _CUBIC_SUPPORT
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    taps = int(math.ceil(support)) * 2 + 1

    centers = scale * (np.arange(out_size) + 0.5)
    first = np.maximum(np.trunc(centers - support + 0.5).astype(np.int64), 0)
    last = np.minimum(np.trunc(centers + support + 0.5).astype(np.int64), in_size)
    count = np.clip(last - first, 0, taps)

    offsets = np.arange(taps)
    valid = offsets[None, :] < count[:, None]
    source = first[:, None] + offsets[None, :]
    weights = np.where(valid, _cubic((source - centers[:, None] + 0.5) * inv_scale), 0.0)
    total = np.zeros(out_size)
    for tap in range(taps):  # summed tap by tap, in the kernel's order, so rounding matches
        total += weights[:, tap]
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights)
    return np.where(valid, source, first[:, None]), weights


def _quantise(weights: np.ndarray) -> tuple[np.ndarray, int]:
    """int16-range integer weights and their number of fractional bits, chosen from the largest weight."""
    largest = weights.max()
    bits = 0
    while bits < _MAX_WEIGHT_BITS and int(0.5 + largest * (1 << (bits + 1))) < _INT16_LIMIT:
        bits += 1
    scaled = weights * (1 << bits)
    return np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5)).astype(np.int32), bits


def _resize_axis(image: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    source, weights = _filter_taps(image.shape[axis], out_size)
    fixed, bits = _quantise(weights)
    pixels = np.moveaxis(image, axis, 0).astype(np.int32)
    accumulator = np.full((out_size,) + pixels.shape[1:], 1 << (bits - 1), dtype=np.int32)
    weight_shape = (out_size,) + (1,) * (pixels.ndim - 1)
    for tap in range(source.shape[1]):
        accumulator += pixels[source[:, tap]] * fixed[:, tap].reshape(weight_shape)
    resized = np.clip(accumulator >> bits, 0, 255).astype(np.uint8)
    return np.moveaxis(resized, 0, axis)
