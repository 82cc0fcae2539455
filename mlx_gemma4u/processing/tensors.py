"""Turn the processors' numpy outputs into the array type the caller asked for."""

from __future__ import annotations

from typing import Any

import numpy as np

from mlx_gemma4u.errors import InputError

RETURN_TYPES = (None, "np", "mlx")


def convert_outputs(data: dict[str, Any], return_tensors: str | None) -> dict[str, Any]:
    """Convert every numpy array in `data` to `return_tensors` ("np", "mlx" or None, which keeps numpy).

    Non-array values (for example video metadata) pass through unchanged.
    """
    if return_tensors not in RETURN_TYPES:
        raise InputError(
            f"return_tensors={return_tensors!r} is not supported; use 'mlx', 'np' or None "
            "(this package does not use torch)."
        )
    if return_tensors != "mlx":
        return data
    import mlx.core as mx

    return {key: mx.array(value) if isinstance(value, np.ndarray) else value for key, value in data.items()}
