"""Atomic writes: a crash leaves the old file (or folder) or the new one, never half of one.

Everything is written under a temporary name beside its destination, flushed to disk (fsync),
then renamed over it; a failure removes the temporary file and re-raises.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8) atomically."""
    with replacing(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def replacing(path: Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success it replaces `path` atomically.

    The temporary name ends in `suffix` (by default the destination's own), for writers that look
    at it: mx.save_safetensors appends ".safetensors" to any other name, so its caller passes that.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.partial{path.suffix if suffix is None else suffix}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def replacing_folder(path: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path` to fill; on success it takes `path`'s place.

    An existing folder at `path` is moved aside first and deleted only once the new one is in
    place, so a crash leaves the old folder or the new one (or, between two renames, the old one
    under a `.old` name beside it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield staging
        for file in staging.rglob("*"):
            if file.is_file():
                _fsync(file)
        old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
        if path.exists():
            os.replace(path, old)
        os.replace(staging, path)
        _fsync(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
