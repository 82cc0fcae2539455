"""Video: decode with PyAV, sample frames as transformers does, and cut each frame into patch rows.

Sampling (transformers' rule): `num_frames` frames at indices arange(n) * total // n, or with
`fps` given, n = max(1, int(total / video_fps * fps)) frames by the same rule. Where transformers
refuses a clip with fewer frames than `num_frames`, every frame is taken instead. A frame's
timestamp is index / video_fps, the rate measured from the packets (24 fps for bare arrays).

Frames are resized like images (one target size per video, per-frame budget, default 70 soft
tokens) but rescaled by a division, u8 / 255, as transformers' fused normalisation does.

Output of `Gemma4UVideoProcessor` (F = frames of all videos, T = max_soft_tokens):
  pixel_values_videos (F, T, 6912) float32; video_position_ids (F, T, 2) int64;
  num_frames_per_video (V,) int64; num_soft_tokens_per_video (V,) int64 (per frame);
  video_metadata: one VideoMetadata per video.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np

from mlx_gemma4u.errors import InputError
from mlx_gemma4u.processing.image import resize_for_budget
from mlx_gemma4u.processing.patches import check_budget, patchify
from mlx_gemma4u.processing.sources import open_source
from mlx_gemma4u.processing.tensors import convert_outputs

DEFAULT_NUM_FRAMES = 32
DEFAULT_VIDEO_BUDGET = 70
FALLBACK_FPS = 24.0


@dataclass
class VideoMetadata:
    """What the prompt needs about a decoded video: its frame rate and the sampled frame indices."""

    total_num_frames: int
    fps: float
    frames_indices: list[int]

    @property
    def timestamps(self) -> list[float]:
        """Seconds from the start of each sampled frame."""
        return [index / self.fps for index in self.frames_indices]


def sample_indices(total: int, video_fps: float, num_frames: int | None, fps: float | None) -> np.ndarray:
    """Indices of the frames to keep out of `total`; all of them when fewer than asked for."""
    if num_frames is not None and fps is not None:
        raise InputError("num_frames and fps are mutually exclusive; pass only one of them.")
    if fps is not None:
        if fps <= 0:
            raise InputError(f"fps={fps!r} must be positive.")
        num_frames = max(1, int(total / video_fps * fps))
    if num_frames is None:
        num_frames = DEFAULT_NUM_FRAMES
    if num_frames <= 0:
        raise InputError(f"num_frames={num_frames!r} must be positive.")
    count = min(num_frames, total)
    return np.arange(count, dtype=np.int64) * total // count


def read_video(
    source: str | Path, num_frames: int | None = None, fps: float | None = None
) -> tuple[np.ndarray, VideoMetadata]:
    """Decode the sampled frames of a video file or URL: (frames, H, W, 3) uint8 and its metadata."""
    opened = open_source(source, "video")
    try:
        with av.open(str(opened) if isinstance(opened, Path) else opened) as container:
            if not container.streams.video:
                raise InputError(f"The file {str(source)!r} has no video stream; pass a video file.")
            if _is_still_image(container):
                raise InputError(f"The file {str(source)!r} is a still image, not a video; pass it as an image.")
            stream = container.streams.video[0]
            total, video_fps = scan_packets(container, stream)
            indices = sample_indices(total, video_fps, num_frames, fps)
            frames = _decode_frames(container, stream, indices)
    except av.FFmpegError as exc:
        raise InputError(
            f"Could not decode the video {str(source)!r} ({exc}); pass an mp4, webm or mov file."
        ) from None
    if len(frames) != len(indices):
        raise InputError(f"The video {str(source)!r} ended after {len(frames)} frames; it may be truncated.")
    return np.stack(frames), VideoMetadata(total, video_fps, indices.tolist())


def _is_still_image(container: av.container.InputContainer) -> bool:
    """FFmpeg opens a jpg or png as a one-frame "video" (image2 or a *_pipe demuxer) that decodes
    to nothing after the packet scan; animated formats (gif, apng) have demuxers of their own."""
    return container.format.name == "image2" or container.format.name.endswith("_pipe")


def scan_packets(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> tuple[int, float]:
    """Frame count and average frame rate measured from the stream's packets, as torchcodec's exact mode does.

    The rate is frames / (end of the last frame - start of the first), which can differ slightly
    from the header's rate (a 15 fps WebM measures 15.0075), and that moves MM:SS timestamps.
    """
    total, first, end = 0, None, None
    for packet in container.demux(stream):
        if not packet.size or packet.pts is None:
            continue
        total += 1
        first = packet.pts if first is None else min(first, packet.pts)
        stop = packet.pts + (packet.duration or 0)
        end = stop if end is None else max(end, stop)
    container.seek(0)
    if total == 0:
        raise InputError("The video has no frames; pass a clip with at least one frame.")
    if end > first:
        return total, total / float((end - first) * stream.time_base)
    return total, float(stream.average_rate) if stream.average_rate else FALLBACK_FPS


def _decode_frames(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, indices: np.ndarray
) -> list[np.ndarray]:
    wanted = set(indices.tolist())
    frames = []
    for position, frame in enumerate(container.decode(stream)):
        if position in wanted:
            frames.append(frame.to_ndarray(format="rgb24"))
        if position >= indices[-1]:
            break
    return frames


def frames_from_array(video: np.ndarray, num_frames: int | None, fps: float | None) -> tuple[np.ndarray, VideoMetadata]:
    """Sample an already decoded (frames, H, W, 3) uint8 array, taken to run at 24 fps."""
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise InputError(f"A video array must be (frames, H, W, 3) uint8; got {video.shape} {video.dtype}.")
    indices = sample_indices(video.shape[0], FALLBACK_FPS, num_frames, fps)
    return video[indices], VideoMetadata(video.shape[0], FALLBACK_FPS, indices.tolist())


class Gemma4UVideoProcessor:
    """Turns videos into per-frame padded 48x48 patch rows plus the metadata for timestamps."""

    def __init__(
        self, num_frames: int | None = DEFAULT_NUM_FRAMES, max_soft_tokens: int = DEFAULT_VIDEO_BUDGET
    ) -> None:
        self.num_frames = num_frames
        self.max_soft_tokens = check_budget(max_soft_tokens)

    def __call__(
        self,
        videos: Any,
        num_frames: int | None = None,
        fps: float | None = None,
        max_soft_tokens: int | None = None,
        return_tensors: str | None = None,
    ) -> dict[str, Any]:
        """Process one video or a list of videos (paths, URLs or frame arrays); see the module docstring."""
        budget = check_budget(self.max_soft_tokens if max_soft_tokens is None else max_soft_tokens)
        if num_frames is None and fps is None:
            num_frames = self.num_frames
        videos = videos if isinstance(videos, list) else [videos]
        if not videos:
            raise InputError("No videos were given to the video processor; pass at least one video.")
        rows, positions, frame_counts, token_counts, metadata = [], [], [], [], []
        for video in videos:
            frames, meta = self._load(video, num_frames, fps)
            frame_rows, frame_positions, count = self._patchify_frames(frames, budget)
            rows.extend(frame_rows)
            positions.extend(frame_positions)
            frame_counts.append(len(frames))
            token_counts.append(count)
            metadata.append(meta)
        data = {
            "pixel_values_videos": np.stack(rows),
            "video_position_ids": np.stack(positions),
            "num_frames_per_video": np.array(frame_counts, dtype=np.int64),
            "num_soft_tokens_per_video": np.array(token_counts, dtype=np.int64),
        }
        return {**convert_outputs(data, return_tensors), "video_metadata": metadata}

    @staticmethod
    def _load(video: Any, num_frames: int | None, fps: float | None) -> tuple[np.ndarray, VideoMetadata]:
        if isinstance(video, np.ndarray):
            return frames_from_array(video, num_frames, fps)
        if isinstance(video, (str, Path)):
            return read_video(video, num_frames, fps)
        raise InputError(f"A video of type {type(video).__name__} is not supported; pass a path, URL or frame array.")

    @staticmethod
    def _patchify_frames(frames: np.ndarray, budget: int) -> tuple[list[np.ndarray], list[np.ndarray], int]:
        rows, positions, count = [], [], 0
        for frame in frames:
            resized = resize_for_budget(frame, budget)
            frame_rows, frame_positions, count = patchify(resized.astype(np.float32) / np.float32(255), budget)
            rows.append(frame_rows)
            positions.append(frame_positions)
        return rows, positions, count
