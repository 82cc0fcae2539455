"""Turn processor patch rows back into the image they came from, to compare with golden PNGs."""

import numpy as np


def reassemble(rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(P, 6912) rows in [0, 1] at (P, 2) (x, y) positions -> the uint8 HWC image; (-1, -1) rows skipped."""
    real = positions[:, 0] >= 0
    xs, ys = positions[real, 0], positions[real, 1]
    image = np.zeros(((ys.max() + 1) * 48, (xs.max() + 1) * 48, 3), np.float32)
    for row, x, y in zip(rows[real], xs, ys):
        image[y * 48 : (y + 1) * 48, x * 48 : (x + 1) * 48] = row.reshape(48, 48, 3)
    return np.rint(image * 255).astype(np.uint8)
