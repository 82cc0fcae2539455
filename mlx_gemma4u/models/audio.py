"""The audio path: each raw 640-sample frame (40 ms at 16 kHz) becomes one soft token.

    s = Linear(RMSNormNoScale(frame))

No mel spectrogram, no encoder, no downsampling: the decoder's 1-D positions are the only notion
of time, and the per-frame RMS norm makes the result independent of loudness.
"""

import mlx.core as mx
import numpy as np

from mlx_gemma4u.errors import InputError
from mlx_gemma4u.models.config import AudioConfig
from mlx_gemma4u.models.multimodal import MultimodalEmbedder, kept_rows


class AudioEmbedder(MultimodalEmbedder):
    def __init__(self, config: AudioConfig, text_hidden_size: int):
        super().__init__(config.audio_embed_dim, text_hidden_size, config.rms_norm_eps)
        self.frame_size = config.audio_embed_dim

    def __call__(self, input_features: mx.array, input_features_mask: mx.array) -> mx.array:
        """(N, F, 640) frames and (N, F) mask -> (M, D) soft tokens of the M frames the mask keeps."""
        if input_features.ndim != 3 or input_features.shape[-1] != self.frame_size:
            raise InputError(
                f"input_features must have shape (clips, frames, {self.frame_size}), got {tuple(input_features.shape)}."
            )
        if tuple(input_features_mask.shape) != tuple(input_features.shape[:2]):
            raise InputError(
                f"input_features_mask must have shape {tuple(input_features.shape[:2])}, "
                f"got {tuple(input_features_mask.shape)}."
            )
        return kept_rows(super().__call__(input_features), np.array(input_features_mask).astype(bool))
