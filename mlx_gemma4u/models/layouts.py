"""The weight layouts a model folder can hold, and the one mapping from each to our module paths.

    transformers      model.language_model.*, model.vision_embedder.*, model.embed_vision.*,
                      model.embed_audio.*  (Google's repos; `model.*` alone: text-only CausalLM)
    mlx-community     language_model.model.*, vision_embedder.*, embed_vision.*, embed_audio.*
                      (what mlx-vlm writes and runs, and the apps built on it; mlx-lm's text-only
                      conversions are this layout without the media weights)
    mlx-gemma4u-v1    our module paths as they are (what this package's converter wrote before)
    assistant         model.*, pre_projection.*, post_projection.*, masked_embedding.*: the MTP
                      drafter's names, transformers' and ours alike (Google's repos and our conversions)

The layout is read off the weight names, never guessed from a repo name (the assistant's is known
from its config.json's model_type). loading.py and convert.py both ask this module, so a key means
the same thing whichever of them reads it; convert writes the mlx-community layout, so its output
loads in mlx-vlm too (an assistant is written in its own layout).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from mlx_gemma4u.errors import CheckpointError
from mlx_gemma4u.models.config import ModelConfig


@dataclass(frozen=True)
class Layout:
    """One way of naming the weights on disk.

    reads: (stored prefix, our prefix) pairs; writes: (our prefix, stored prefix) pairs. The
    longest matching prefix wins, so a specific rename can sit beside a general one.
    """

    name: str
    reads: tuple[tuple[str, str], ...]
    writes: tuple[tuple[str, str], ...]
    ignored: tuple[str, ...] = ()

    def ours(self, key: str) -> str | None:
        """A stored key or module path -> ours (unchanged if no prefix matches); None: means nothing to the model."""
        if key.startswith(self.ignored) or "rotary_emb" in key or key.endswith("embed_scale"):
            return None
        return _swap(key, self.reads)

    def stored(self, name: str) -> str:
        """Our key or module path -> the name this layout stores it under."""
        return _swap(name, self.writes)


def _swap(name: str, pairs: tuple[tuple[str, str], ...]) -> str:
    dotted = name + "."  # so a module path ("lm_head") matches its prefix ("lm_head.") too
    matches = [(old, new) for old, new in pairs if dotted.startswith(old)]
    if not matches:
        return name
    old, new = max(matches, key=lambda pair: len(pair[0]))
    return (new + dotted[len(old) :])[:-1]


TRANSFORMERS = Layout(
    "transformers",
    reads=(
        ("model.language_model.", "language_model."),
        ("model.vision_embedder.", "embed_vision."),  # on disk (save_pretrained)
        ("model.embed_vision.", "embed_vision."),  # in memory (state_dict)
        ("model.embed_vision.embedding_projection.", "embed_vision.multimodal_embedder.embedding_projection."),
        ("model.embed_vision.multimodal_embedder.", "embed_vision.multimodal_embedder."),
        ("model.embed_audio.", "embed_audio."),
        ("lm_head.", "lm_head."),
        ("model.", "language_model."),
    ),  # text-only Gemma4UnifiedForCausalLM
    writes=(
        ("language_model.", "model.language_model."),
        ("embed_vision.", "model.vision_embedder."),
        ("embed_vision.multimodal_embedder.", "model.embed_vision."),
        ("embed_audio.", "model.embed_audio."),
        ("lm_head.", "lm_head."),
    ),
    # vestigial Gemma 3n-style embedding tables some checkpoints carry (vLLM ignores them too)
    ignored=("model.embed_vision.embedding.", "model.embed_audio.embedding."),
)
_COMMUNITY = (
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_embedder.", "embed_vision."),
    ("embed_vision.", "embed_vision.multimodal_embedder."),
    ("embed_audio.", "embed_audio."),
)
COMMUNITY = Layout("mlx-community", reads=_COMMUNITY, writes=tuple((new, old) for old, new in _COMMUNITY))
_OURS = tuple((p, p) for p in ("language_model.", "embed_vision.", "embed_audio.", "lm_head."))
OURS_V1 = Layout("mlx-gemma4u-v1", reads=_OURS, writes=_OURS)
ASSISTANT = Layout("assistant", reads=(), writes=())  # draft.DraftModel's paths are transformers' names


def detect(keys: Iterable[str]) -> Layout:
    """The layout of a checkpoint, from its weight names (the token embedding's prefix tells them apart)."""
    keys = sorted(keys)
    if any(k.startswith("language_model.model.") for k in keys):
        return COMMUNITY
    if any(k.startswith(("model.", "lm_head.")) for k in keys):
        return TRANSFORMERS
    if any(k.startswith("language_model.") for k in keys):
        return OURS_V1
    first = keys[0] if keys else "(none)"
    raise CheckpointError(
        f"The checkpoint's weights are in no layout this package knows: it cannot place {first!r} "
        "(expected transformers', mlx-community's or mlx-gemma4u's names)."
    )


def quantization_in_our_names(quantization: dict, layout: Layout) -> dict:
    """config.json's "quantization" with its per-module entries keyed by our module paths."""
    return {layout.ours(k) if isinstance(v, dict) else k: v for k, v in quantization.items()}


def quantization_in(quantization: dict, layout: Layout) -> dict:
    """Our "quantization" entry with its per-module keys in `layout`'s names (for writing config.json)."""
    return {layout.stored(k) if isinstance(v, dict) else k: v for k, v in quantization.items()}


def in_layout(weights: dict, layout: Layout) -> dict:
    """Tensors under our names -> the same tensors under `layout`'s names."""
    return {layout.stored(k): v for k, v in weights.items()}


def without_absent_media(config: ModelConfig, keys: Iterable[str], layout: Layout) -> ModelConfig:
    """An mlx-community folder without vision or audio weights (mlx-lm's text-only conversions keep
    the media configs) -> the config without those embedders, so text works and media get a clear error."""
    if layout is not COMMUNITY:
        return config
    ours = [layout.ours(k) or "" for k in keys]
    vision = config.vision if any(k.startswith("embed_vision.") for k in ours) else None
    audio = config.audio if any(k.startswith("embed_audio.") for k in ours) else None
    return dataclasses.replace(config, vision=vision, audio=audio)
