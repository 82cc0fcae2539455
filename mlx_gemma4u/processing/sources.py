"""Where media bytes come from: a local path or an http(s) URL.

Every loader (image, audio, video) calls `open_source` so that a missing file or an unreachable
URL produces the same one-sentence `InputError`, whatever the media type.
"""

from __future__ import annotations

import io
import urllib.error
import urllib.request
from pathlib import Path

from mlx_gemma4u.errors import InputError

URL_TIMEOUT_S = 20.0


def is_url(source: object) -> bool:
    """True for strings that start with http:// or https://."""
    return isinstance(source, str) and source.startswith(("http://", "https://"))


def open_source(source: str | Path, kind: str, timeout: float = URL_TIMEOUT_S) -> Path | io.BytesIO:
    """Return a readable local path, or the downloaded bytes of a URL, for a media `source`.

    `kind` ("image", "audio", "video") only words the error messages.
    """
    if is_url(source):
        return io.BytesIO(_download(str(source), kind, timeout))
    path = Path(source).expanduser()
    if path.is_dir():
        raise InputError(f"The {kind} path {str(source)!r} is a folder, not a file; pass the {kind} file itself.")
    if not path.is_file():
        raise InputError(f"The {kind} file {str(source)!r} does not exist; check the path.")
    return path


def _download(url: str, kind: str, timeout: float) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "mlx-gemma4u"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise InputError(
            f"Could not download the {kind} at {url} ({reason}); check the address and the network, "
            "or pass a local file instead."
        ) from None
