"""The media kinds, named once: what a chat message calls each, what the processor returns for it,
which keyword of `generate` takes it, and which placeholder token of the config it fills."""

from __future__ import annotations

from typing import NamedTuple


class MediaKind(NamedTuple):
    name: str  # the chat message item's "type", and the kind the model embeds
    keyword: str  # the generate / processor keyword that takes a list of them
    values: str  # the processor's array of its values
    extra: str  # the processor's array that goes with them (positions, or the audio frame mask)
    token: str  # the config field of its placeholder token id


KINDS = (
    MediaKind("image", "images", "pixel_values", "image_position_ids", "image_token_id"),
    MediaKind("video", "videos", "pixel_values_videos", "video_position_ids", "video_token_id"),
    MediaKind("audio", "audio", "input_features", "input_features_mask", "audio_token_id"),
)
BY_NAME = {kind.name: kind for kind in KINDS}
ARRAYS = tuple(name for kind in KINDS for name in (kind.values, kind.extra))  # the processor's media arrays
