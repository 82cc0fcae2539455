"""Audio: load any accepted clip as a 16 kHz mono float32 waveform, then cut it into 640-sample frames.

Accepted inputs: a path or http(s) URL to wav, flac, ogg (Vorbis, Opus) or mp3, read with soundfile
(libsndfile 1.1 or newer, which its wheels bundle, reads mp3; other formats it knows work too), or an array of
shape (samples,) or (samples, channels) with its sampling rate. Channels are averaged to mono and
other rates are resampled with soxr (the SoX resampler library, "HQ" quality).

Every sample is kept: one audio token per 640 samples, ceil(samples / 640) tokens, no cap.
`max_audio_seconds` lets a caller refuse longer clips with a clear error instead.

Output of `Gemma4UAudioFeatureExtractor` (N clips, F = frames of the longest clip):
  input_features (N, F, 640) float32, zero-padded; input_features_mask (N, F) bool.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import soxr

from mlx_gemma4u.errors import InputError
from mlx_gemma4u.processing.sources import open_source
from mlx_gemma4u.processing.tensors import convert_outputs

FORMATS = "wav, flac, ogg or mp3"  # what help texts and errors name
SAMPLING_RATE = 16_000
SAMPLES_PER_TOKEN = 640  # 40 ms at 16 kHz
_MAX_CHANNELS = 8


def load_audio(source: str | Path) -> tuple[np.ndarray, int]:
    """Read an audio file or URL: (samples, channels) float32 in [-1, 1] and its sampling rate."""
    opened = open_source(source, "audio")
    try:
        samples, rate = soundfile.read(opened, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise InputError(f"Could not read the audio {str(source)!r} ({exc}); pass a {FORMATS} file.") from None
    return samples, int(rate)


def to_waveform(audio: Any, sampling_rate: int | None = None) -> np.ndarray:
    """Any accepted audio input as a 16 kHz mono float32 waveform of shape (samples,).

    Arrays without a `sampling_rate` are taken to be 16 kHz already, as transformers assumes.
    A (array, rate) tuple carries its own rate.
    """
    name = "audio"
    if isinstance(audio, tuple) and len(audio) == 2:
        audio, sampling_rate = audio
    if isinstance(audio, (str, Path)):
        name = str(audio)
        audio, sampling_rate = load_audio(audio)
    samples = np.asarray(audio)
    if not np.issubdtype(samples.dtype, np.number):
        raise InputError(f"The {name} must be a path, URL or numeric array; got {type(audio).__name__}.")
    mono = _to_mono(samples, name)
    _check_content(mono, name)
    rate = SAMPLING_RATE if sampling_rate is None else int(sampling_rate)
    if rate <= 0:
        raise InputError(f"The sampling rate of {name} must be positive; got {sampling_rate!r}.")
    if rate != SAMPLING_RATE:
        mono = soxr.resample(mono.astype(np.float32), rate, SAMPLING_RATE, quality="HQ")
        if mono.size == 0:
            raise InputError(f"The {name} is too short to keep a single sample at 16 kHz; pass a longer clip.")
    return mono


def _to_mono(samples: np.ndarray, name: str) -> np.ndarray:
    if samples.ndim == 1:
        return samples
    if samples.ndim == 2 and samples.shape[1] == 1:
        return samples[:, 0]
    if samples.ndim == 2 and samples.shape[1] <= _MAX_CHANNELS:
        return samples.mean(axis=1, dtype=np.float64).astype(np.float32)
    raise InputError(
        f"The {name} array has shape {samples.shape}; pass (samples,) or (samples, channels) with at most "
        f"{_MAX_CHANNELS} channels (transpose a (channels, samples) array)."
    )


def _check_content(mono: np.ndarray, name: str) -> None:
    if mono.size == 0:
        raise InputError(f"The {name} has no samples; pass a clip that is not empty.")
    if np.issubdtype(mono.dtype, np.floating) and not np.isfinite(mono).all():
        raise InputError(f"The {name} contains NaN or infinite samples; clean or re-export the clip.")


def num_audio_tokens(num_samples: int) -> int:
    """Audio soft tokens for a 16 kHz clip: one per 640 samples, the last one partly padded."""
    return math.ceil(num_samples / SAMPLES_PER_TOKEN)


def frame_waveform(waveform: np.ndarray) -> np.ndarray:
    """(samples,) -> (ceil(samples / 640), 640) float32, zero-padded at the end."""
    frames = num_audio_tokens(waveform.shape[0])
    padded = np.zeros(frames * SAMPLES_PER_TOKEN, dtype=np.float32)
    padded[: waveform.shape[0]] = waveform
    return padded.reshape(frames, SAMPLES_PER_TOKEN)


class Gemma4UAudioFeatureExtractor:
    """Turns audio clips into the raw 640-sample frames the audio embedder reads."""

    sampling_rate = SAMPLING_RATE
    audio_samples_per_token = SAMPLES_PER_TOKEN

    def __init__(self, max_audio_seconds: float | None = None) -> None:
        self.max_audio_seconds = max_audio_seconds

    def __call__(
        self, raw_speech: Any, sampling_rate: int | None = None, return_tensors: str | None = None
    ) -> dict[str, Any]:
        """Frame one clip or a list of clips; see the module docstring for the outputs."""
        clips = as_clip_list(raw_speech)
        if not clips:
            raise InputError("No audio was given to the feature extractor; pass at least one clip.")
        framed = [frame_waveform(self._within_limit(to_waveform(clip, sampling_rate), clip)) for clip in clips]
        longest = max(frames.shape[0] for frames in framed)
        features = np.zeros((len(framed), longest, SAMPLES_PER_TOKEN), dtype=np.float32)
        mask = np.zeros((len(framed), longest), dtype=bool)
        for index, frames in enumerate(framed):
            features[index, : frames.shape[0]] = frames
            mask[index, : frames.shape[0]] = True
        return convert_outputs({"input_features": features, "input_features_mask": mask}, return_tensors)

    def _within_limit(self, waveform: np.ndarray, clip: Any) -> np.ndarray:
        seconds = waveform.shape[0] / SAMPLING_RATE
        if self.max_audio_seconds is not None and seconds > self.max_audio_seconds:
            raise InputError(
                f"The audio {_clip_name(clip)} lasts {seconds:.1f} s, more than max_audio_seconds="
                f"{self.max_audio_seconds}; trim it or raise the limit."
            )
        return waveform


def as_clip_list(audio: Any) -> list[Any]:
    """A list of clips from one clip (path, URL, array, (array, rate), list of samples) or a list of clips."""
    if isinstance(audio, list) and (not audio or not isinstance(audio[0], (int, float, np.number))):
        return audio
    return [audio]


def _clip_name(clip: Any) -> str:
    return repr(str(clip)) if isinstance(clip, (str, Path)) else "audio"
