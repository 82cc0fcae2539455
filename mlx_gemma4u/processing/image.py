"""Images: load any accepted input as RGB uint8, then resize, rescale and cut into patch rows.

Accepted inputs: a path or http(s) URL (decoded with Pillow, EXIF orientation applied), a PIL
image, or a numpy array (H, W), (H, W, C) or (C, H, W) with C in {1, 3, 4}. Transparency is
composited onto white, as transformers does for PIL images.

Output of `Gemma4UImageProcessor` (N = number of images, T = max_soft_tokens):
  pixel_values (N, T, 6912) float32 in [0, 1]; image_position_ids (N, T, 2) int64 (x, y), -1 pads;
  num_soft_tokens_per_image (N,) int64.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mlx_gemma4u.errors import InputError
from mlx_gemma4u.processing.patches import check_budget, patchify, target_size
from mlx_gemma4u.processing.resample import resize_uint8
from mlx_gemma4u.processing.sources import open_source
from mlx_gemma4u.processing.tensors import convert_outputs

RESCALE = np.float32(1 / 255)  # transformers multiplies by float32(1/255) for images


def load_image(source: str | Path) -> Image.Image:
    """Open and fully decode an image file or URL, upright per its EXIF orientation."""
    opened = open_source(source, "image")
    try:
        image = Image.open(opened)
        image.load()
    except UnidentifiedImageError:
        raise InputError(
            f"The file {str(source)!r} is not an image Pillow can read; pass a JPEG, PNG, WebP or GIF."
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(
            f"The image {str(source)!r} is damaged or truncated ({exc}); re-export or re-download it."
        ) from None
    return ImageOps.exif_transpose(image)


def to_rgb_array(image: Any) -> np.ndarray:
    """Any accepted image input as an (H, W, 3) uint8 array."""
    if isinstance(image, (str, Path)):
        image = load_image(image)
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise InputError(
        f"An image of type {type(image).__name__} is not supported; pass a path, URL, PIL image or numpy array."
    )


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.asarray(image.convert("RGB"))


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise InputError(f"An image array must be (H, W) or (H, W, C); got shape {array.shape}.")
    if array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # channels-first input
    if array.shape[-1] not in (1, 3, 4):
        raise InputError(f"An image array needs 1, 3 or 4 channels; got shape {array.shape}.")
    pixels = _as_uint8(array)
    if pixels.shape[-1] == 1:
        return np.repeat(pixels, 3, axis=-1)
    if pixels.shape[-1] == 4:
        return _composite_on_white(pixels)
    return pixels


def _as_uint8(array: np.ndarray) -> np.ndarray:
    """uint8 arrays pass through; float arrays in [0, 1] are rounded to 0..255."""
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating) and array.size == 0:
        return array.astype(np.uint8)  # refused with its size when it is cut into patches
    if np.issubdtype(array.dtype, np.floating) and np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1:
        return np.rint(array * 255).astype(np.uint8)
    raise InputError(f"An image array must be uint8 (0-255) or float in [0, 1]; got dtype {array.dtype}.")


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Blend onto white in float32 and convert back as torchvision does (x * 255.999, truncated)."""
    values = rgba.astype(np.float32) / np.float32(255)
    alpha = values[..., 3:]
    blended = values[..., :3] * alpha + (1 - alpha)
    return (blended * np.float32(255.999)).astype(np.uint8)


def flatten_images(images: Any) -> list[Any]:
    """One flat list from a single image, a list, or a per-sample nested list of images."""
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in flatten_images(item)]
    return [images]


def resize_for_budget(rgb: np.ndarray, max_soft_tokens: int) -> np.ndarray:
    """Resize an (H, W, 3) uint8 image to the budget's target size (multiples of 48)."""
    height, width = target_size(rgb.shape[0], rgb.shape[1], max_soft_tokens)
    return resize_uint8(rgb, height, width)


class Gemma4UImageProcessor:
    """Turns images into the padded 48x48 patch rows the vision embedder reads."""

    def __init__(self, max_soft_tokens: int = 280) -> None:
        self.max_soft_tokens = check_budget(max_soft_tokens)

    def __call__(
        self, images: Any, max_soft_tokens: int | None = None, return_tensors: str | None = None
    ) -> dict[str, Any]:
        """Process one image or a (nested) list of images; see the module docstring for outputs."""
        budget = check_budget(self.max_soft_tokens if max_soft_tokens is None else max_soft_tokens)
        rows, positions, counts = [], [], []
        for image in flatten_images(images):
            resized = resize_for_budget(to_rgb_array(image), budget)
            image_rows, image_positions, count = patchify(resized.astype(np.float32) * RESCALE, budget)
            rows.append(image_rows)
            positions.append(image_positions)
            counts.append(count)
        if not rows:
            raise InputError("No images were given to the image processor; pass at least one image.")
        data = {
            "pixel_values": np.stack(rows),
            "image_position_ids": np.stack(positions),
            "num_soft_tokens_per_image": np.array(counts, dtype=np.int64),
        }
        return convert_outputs(data, return_tensors)

    preprocess = __call__
