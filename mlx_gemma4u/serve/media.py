"""A request's media, read under the server's limits before any of it reaches the processor.

Images come as data: URIs, http(s) URLs (fetch.py's policy) or, with --allow-local-files, local
paths; audio as base64; video as a data: URI or URL (written to a temporary file, which PyAV
reads) or a local path. Each is checked from its header before it is decoded: an image's pixels,
an audio clip's seconds, a video's frames and seconds, so that a small file that would decode to
gigabytes is refused while it is still small. Every failure is one InputError sentence that names
no path of this machine.
"""

from __future__ import annotations

import base64
import binascii
import io
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mlx_gemma4u.errors import InputError
from mlx_gemma4u.serve.fetch import FetchPolicy, fetch


@dataclass(frozen=True)
class MediaLimits:
    image_pixels: int = 36_000_000
    audio_seconds: float = 120.0
    video_seconds: float = 120.0
    video_frames: int = 3_600
    allow_local_files: bool = False
    fetch: FetchPolicy = field(default_factory=FetchPolicy)


class MediaReader:
    """One request's media references -> processor inputs; owns the request's temporary video
    files, removed by `close`."""

    def __init__(self, limits: MediaLimits):
        self.limits = limits
        self._folder: tempfile.TemporaryDirectory | None = None

    def close(self) -> None:
        if self._folder is not None:
            self._folder.cleanup()

    def image(self, url: str) -> dict:
        from PIL import Image

        try:
            image = Image.open(io.BytesIO(self._bytes(url, "image")))
            width, height = image.size
            if width * height <= self.limits.image_pixels:
                image.load()
                return {"type": "image", "image": image}
        except InputError:
            raise
        except Image.DecompressionBombError:
            width = height = None
        except Exception:  # PIL raises many kinds for a damaged or hostile file
            raise InputError("The image data is not a readable image.") from None
        size = f"{width} x {height} pixels" if width else "more pixels than PIL allows"
        raise InputError(f"The image has {size}; this server takes at most {self.limits.image_pixels:,} pixels.")

    def audio(self, data: str, fmt: str | None) -> dict:
        return self.audio_bytes(_base64(data, "input_audio.data"), fmt or "audio", "input_audio")

    def audio_bytes(self, data: bytes, fmt: str, where: str) -> dict:
        """An audio file's bytes (any format soundfile reads) -> a content part of its samples."""
        import soundfile

        raw = io.BytesIO(data)
        try:
            info = soundfile.info(raw)
            seconds = info.frames / info.samplerate
            if seconds <= self.limits.audio_seconds:
                raw.seek(0)
                return {"type": "audio", "audio": soundfile.read(raw, dtype="float32")}
        except Exception:
            raise InputError(f"{where} holds no readable {fmt} data.") from None
        raise InputError(
            f"The audio lasts {seconds:.1f} s; this server takes clips of at most {self.limits.audio_seconds:g} s."
        )

    def video(self, url: str) -> dict:
        if url.startswith(("data:", "http://", "https://")):
            path = self._new_file()
            path.write_bytes(self._bytes(url, "video"))
        else:
            path = self._local(url, "video")
        self._check_video(path)
        return {"type": "video", "path": str(path)}

    def hide_paths(self, message: str) -> str:
        """`message` with this request's temporary folder named as "the video" instead."""
        return message if self._folder is None else message.replace(self._folder.name, "the video")

    def _bytes(self, url: str, kind: str) -> bytes:
        if url.startswith("data:"):
            return _data_uri(url)
        if url.startswith(("http://", "https://")):
            return fetch(url, kind, self.limits.fetch)
        path = self._local(url, kind)
        if path.stat().st_size > self.limits.fetch.max_bytes:
            raise InputError(
                f"The {kind} file is larger than this server's limit of {self.limits.fetch.max_bytes / 1e6:g} MB."
            )
        return path.read_bytes()

    def _local(self, url: str, kind: str) -> Path:
        if not self.limits.allow_local_files:
            raise InputError(
                f"The {kind} must be a data: URI or an http(s) URL; this server reads no local files "
                "(it would with --allow-local-files)."
            )
        path = Path(url.removeprefix("file://"))
        if not path.is_file():
            raise InputError(f"There is no {kind} file at {url!r}.")
        return path

    def _new_file(self) -> Path:
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="mlx-gemma4u-video-")
        return Path(self._folder.name) / f"video-{len(list(Path(self._folder.name).iterdir()))}"

    def _check_video(self, path: Path) -> None:
        """Refuse a video with more frames or seconds than the limits, counted from its packets
        (demuxing reads no pixels)."""
        import av

        from mlx_gemma4u.processing.video import scan_packets

        try:
            with av.open(str(path)) as container:
                frames, fps = scan_packets(container, container.streams.video[0])
        except InputError:
            raise
        except Exception:
            raise InputError("The video data is not a readable video.") from None
        limits = self.limits
        if frames > limits.video_frames or frames / fps > limits.video_seconds:
            raise InputError(
                f"The video has {frames} frames over {frames / fps:.1f} s; this server takes at most "
                f"{limits.video_frames} frames and {limits.video_seconds:g} s."
            )


def _data_uri(uri: str) -> bytes:
    header, _, data = uri.partition(",")
    if ";base64" not in header:
        raise InputError("Media data URIs must be base64 encoded (data:<type>;base64,...).")
    return _base64(data, "the data URI")


def _base64(data: str, what: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise InputError(f"{what} is not valid base64.") from None
