"""Torch-free input pipeline for Gemma 4 Unified, equal to transformers 5.23's Gemma4UnifiedProcessor.

Modules: `image` (images to 48x48 patch rows), `video` (PyAV decoding and frame sampling),
`audio` (16 kHz mono 640-sample frames), `text` (tokenizer, placeholders, type ids),
`chat_template` (Jinja rendering), `messages` (chat message checks), `processor` (all of them
behind one call). Helpers: `patches` (budgets and patch rows, shared by images and video frames),
`resample` (torch-exact bicubic resize), `sources` (paths and URLs), `tensors` (numpy or mlx out).
"""

from mlx_gemma4u.processing.audio import Gemma4UAudioFeatureExtractor
from mlx_gemma4u.processing.image import Gemma4UImageProcessor
from mlx_gemma4u.processing.processor import Gemma4UProcessor
from mlx_gemma4u.processing.video import Gemma4UVideoProcessor

__all__ = ["Gemma4UAudioFeatureExtractor", "Gemma4UImageProcessor", "Gemma4UProcessor", "Gemma4UVideoProcessor"]
