"""safetensors headers, checked against their file before anything is loaded.

A truncated or hostile file (a header that claims more bytes than the file has, tensors that lie
past its end or overlap, unknown dtypes) fails here with one sentence instead of deep inside MLX.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from mlx_gemma4u.errors import CheckpointError

SAFETENSORS_DTYPES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "U32": 4,
    "U16": 2,
    "U64": 8,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_MAX_HEADER = 100 * 1024 * 1024


def check_safetensors(file: Path) -> dict[str, int]:
    """Check a safetensors header against the file before loading (sizes, dtypes, bounds, overlaps)
    -> the bytes of tensor data per safetensors dtype."""
    if not file.is_file():
        raise CheckpointError(f"{file} is missing.")
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file} is truncated: it is too short to be a safetensors file.")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{file} is truncated or not a safetensors file (its header claims {n} bytes).")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{file} has an unreadable safetensors header.") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} has an unreadable safetensors header.")
    spans, sizes = [], {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            count = math.prod(int(d) for d in shape)
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{file}: the header entry for {name!r} is malformed.") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has an unsupported dtype {dtype!r}.")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= size - 8 - n):
            raise CheckpointError(f"{file} is truncated: tensor {name!r} lies past the end of the file.")
        if end - start != count * SAFETENSORS_DTYPES[dtype]:
            raise CheckpointError(
                f"{file}: tensor {name!r} claims shape {shape} but holds {end - start} bytes; the file is corrupt."
            )
        spans.append((start, end, name))
        sizes[dtype] = sizes.get(dtype, 0) + end - start
    spans.sort()
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise CheckpointError(f"{file}: tensors {a!r} and {b!r} overlap; the file is corrupt.")
    return sizes
