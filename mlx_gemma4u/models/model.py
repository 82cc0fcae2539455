"""The whole Gemma 4 Unified model: embeds text and media, runs the decoder, returns logits.

    ids --(placeholders -> pad, embed, * sqrt(D))--> h --(soft tokens overwrite placeholders)-->
    h --decoder (masks per layer type)--> final norm --tied head--> softcap --> logits

`model(input_ids, cache=None, attention_mask=None, mm_token_type_ids=None, **media)` takes the
transformers processor's output names: pixel_values / image_position_ids, pixel_values_videos /
video_position_ids, input_features / input_features_mask.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_gemma4u.errors import CheckpointError, InputError
from mlx_gemma4u.kernels import softcap
from mlx_gemma4u.models import cache as caches
from mlx_gemma4u.models import layouts as checkpoints
from mlx_gemma4u.models import parallel
from mlx_gemma4u.models.audio import AudioEmbedder
from mlx_gemma4u.models.config import FULL, ModelConfig
from mlx_gemma4u.models.decoder import RowSteps, Step, TextModel
from mlx_gemma4u.models.masks import SEMANTICS, build_mask, vision_blocks
from mlx_gemma4u.models.multimodal import compute_dtype, placeholder_positions, scatter_soft_tokens
from mlx_gemma4u.models.vision import VisionEmbedder


class Model(nn.Module):
    def __init__(self, config: ModelConfig, vision_mask: str = "gemma4"):
        super().__init__()
        if vision_mask not in SEMANTICS:
            raise InputError(f"vision_mask must be one of {', '.join(SEMANTICS)}, got {vision_mask!r}.")
        self.config = config
        self.vision_mask = vision_mask
        self.group = None  # the mx.distributed group it is split across (pipeline / shard), if any
        text = config.text
        self.language_model = TextModel(text)
        if config.vision is not None:
            self.embed_vision = VisionEmbedder(config.vision, text.hidden_size)
        if config.audio is not None:
            self.embed_audio = AudioEmbedder(config.audio, text.hidden_size)
        if not text.tie_word_embeddings:
            self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)

    def __call__(
        self,
        input_ids: mx.array,
        cache: list | None = None,
        attention_mask: mx.array | None = None,
        mm_token_type_ids: mx.array | None = None,
        logits_to_keep: int = 0,
        inputs_embeds: mx.array | None = None,
        return_hidden: bool = False,
        **media,
    ) -> mx.array | tuple[mx.array, mx.array]:
        """(B, T) int ids -> (B, T, vocab) logits (only the last `logits_to_keep` positions if > 0).

        inputs_embeds: the (B, T, D) output of `embed` for these ids, when the caller computed it
        once for a whole prompt (generation prefills a long prompt in chunks). return_hidden: also
        return the final-normed hidden states the logits come from (what an MTP drafter reads).
        """
        hidden = self.hidden_states(
            input_ids, cache, attention_mask, mm_token_type_ids, logits_to_keep, inputs_embeds, **media
        )
        return (self.logits(hidden), hidden) if return_hidden else self.logits(hidden)

    def hidden_states(
        self,
        input_ids: mx.array,
        cache: list | None = None,
        attention_mask: mx.array | None = None,
        mm_token_type_ids: mx.array | None = None,
        logits_to_keep: int = 0,
        inputs_embeds: mx.array | None = None,
        **media,
    ) -> mx.array:
        """The final-normed (B, T, D) hidden states the logits come from (see __call__): training
        takes the head of only the positions its loss reads."""
        if input_ids.ndim != 2:
            raise InputError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}.")
        h = self.embed(input_ids, **media) if inputs_embeds is None else inputs_embeds
        step = self._step(input_ids.shape, cache, attention_mask, mm_token_type_ids)
        return self.language_model(h, step, cache, keep=logits_to_keep)

    def rows(
        self, tokens: mx.array, caches: list[list], return_hidden: bool = False
    ) -> mx.array | tuple[mx.array, mx.array]:
        """(B, T) next tokens of B independent sequences, caches[i] row i's caches -> (B, T, vocab)
        logits (and the (B, T, D) hidden states if return_hidden), every row exactly what
        `self(tokens[i:i+1], cache=caches[i])` gives: the Linears run for all rows at once, attention
        per row against its own caches (decoder.RowSteps)."""
        rows = RowSteps([self._step((1, tokens.shape[1]), cache, None, None) for cache in caches])
        per_slot = [tuple(cache[slot] for cache in caches) for slot in range(len(caches[0]))]
        hidden = self.language_model(self.embed(tokens), rows, per_slot)
        return (self.logits(hidden), hidden) if return_hidden else self.logits(hidden)

    def embed(
        self,
        input_ids: mx.array,
        pixel_values: mx.array | None = None,
        image_position_ids: mx.array | None = None,
        pixel_values_videos: mx.array | None = None,
        video_position_ids: mx.array | None = None,
        input_features: mx.array | None = None,
        input_features_mask: mx.array | None = None,
        num_frames_per_video=None,
        soft_tokens: dict[str, mx.array] | None = None,
    ) -> mx.array:
        """(B, T) ids -> (B, T, D) decoder inputs, soft tokens in place of the placeholders.

        soft_tokens: "image" / "video" / "audio" -> (M, D) soft tokens computed beforehand (by
        `soft_tokens`, e.g. kept from an earlier turn); a kind given here needs no media arrays.
        num_frames_per_video is accepted for parity with transformers; frames are already in order.
        """
        if not self.embeds_inputs:
            text = self.language_model
            return mx.zeros((*input_ids.shape, text.config.hidden_size), compute_dtype(text.embed_tokens))
        c = self.config
        placeholder = {"image": c.image_token_id, "video": c.video_token_id, "audio": c.audio_token_id}
        ids = mx.where(_isin(input_ids, set(placeholder.values())), c.text.pad_token_id, input_ids)
        h = self.language_model.embed(ids)
        soft = dict(soft_tokens or {})
        media = {
            "image": (pixel_values, image_position_ids),
            "video": (pixel_values_videos, video_position_ids),
            "audio": (input_features, input_features_mask),
        }
        for kind, (values, extra) in media.items():
            if kind not in soft and values is not None:
                soft[kind] = self.soft_tokens(kind, values, extra)
        for kind, features in soft.items():
            h = scatter_soft_tokens(h, placeholder_positions(input_ids, placeholder[kind]), features, kind)
        return h

    @property
    def embeds_inputs(self) -> bool:
        """False on a later pipeline stage, whose decoder input arrives from the stage before (its
        `embed` gives zeros of the right shape, and it has no media embedders)."""
        stage = self.language_model.stage
        return stage is None or stage.start == 0

    def soft_tokens(self, kind: str, values: mx.array, extra: mx.array | None) -> mx.array:
        """The (M, D) soft tokens of one kind of media: "image" / "video" with their pixel values and
        position ids, "audio" with its input features and their mask (the processor's arrays)."""
        if kind != "audio":
            return self._vision(kind, values, extra)
        if extra is None:
            raise InputError("input_features needs its input_features_mask (which frames are real audio).")
        if "embed_audio" not in self:
            raise InputError(
                "This checkpoint has no audio weights (a text-only model or conversion), so it "
                "cannot take audio inputs."
            )
        return self.embed_audio(values, extra)

    def _vision(self, what: str, pixel_values: mx.array, position_ids: mx.array | None) -> mx.array:
        if "embed_vision" not in self:
            raise InputError(
                f"This checkpoint has no vision weights (a text-only model or conversion), so it "
                f"cannot take {what} inputs."
            )
        if position_ids is None:
            raise InputError(f"{what} pixel values need their {what}_position_ids.")
        return self.embed_vision(pixel_values, position_ids)

    def logits(self, h: mx.array) -> mx.array:
        """(B, T, D) final hidden states -> (B, T, vocab), soft-capped if the config says so."""
        if "lm_head" in self:
            out = self.lm_head(h)
        else:
            out = self.language_model.embed_tokens.as_linear(h)
        cap = self.config.text.final_logit_softcapping
        return softcap(out, cap) if cap else out

    def _step(self, shape, cache, attention_mask, mm_token_type_ids) -> Step:
        """Positions and masks of one forward pass over T new tokens after `past` cached ones."""
        B, T = shape
        text = self.config.text
        past = self.language_model.past(cache) if cache else 0
        offset, key_valid = past, None
        if attention_mask is not None:
            key_valid, pads = _left_padding(attention_mask, B, past + T)
            offset = past - pads if pads.max().item() > 0 else past
        blocks = None
        if mm_token_type_ids is not None and text.use_bidirectional_attention == "vision":
            if tuple(mm_token_type_ids.shape) != (B, T):
                raise InputError(f"mm_token_type_ids must have shape {(B, T)}, got {tuple(mm_token_type_ids.shape)}.")
            blocks = vision_blocks(mm_token_type_ids)
            if blocks.max().item() < 0:
                blocks = None
        q_pos = mx.arange(past, past + T)

        def make_mask(layer_type, layer_cache, n_keys):
            if blocks is None and key_valid is None and (layer_type == FULL or n_keys <= text.sliding_window):
                return None if T == 1 else "causal"
            k_pos = mx.arange(past + T - n_keys, past + T)  # every cache returns the last n_keys, in order
            k_blocks = None
            if blocks is not None:
                local = k_pos - past
                k_blocks = mx.where(local >= 0, mx.take(blocks, mx.maximum(local, 0), axis=1), -1)
            valid = mx.take(key_valid, k_pos, axis=1) if key_valid is not None else None
            return build_mask(layer_type, self.vision_mask, text.sliding_window, q_pos, k_pos, blocks, k_blocks, valid)

        return Step(offset, make_mask)

    def shared_kv(self, cache: list) -> dict:
        """Layer type -> the cache of the last layer of that type that computes keys and values: the
        keys and values an MTP drafter attends to (draft.py), whether or not later layers reuse them."""
        slots = self.language_model._cache_slot  # layer index -> cache index, in layer order
        return {self.config.text.layers[i].layer_type: cache[s] for i, s in sorted(slots.items())}

    def pipeline(self, group) -> None:
        """Keep only this rank's pipeline stage (models/parallel.py), before the weights load: its
        decoder layers, and the media embedders on the first rank only (they feed it alone)."""
        parallel.pipeline(self.language_model, group)
        self.group = group
        if group.rank() > 0:
            for name in ("embed_vision", "embed_audio"):
                if name in self:
                    delattr(self, name)

    def shard(self, group) -> None:
        """Tensor parallel: every layer's heads and MLP split across `group` (models/parallel.py)."""
        parallel.shard(self.language_model, group)
        self.group = group

    def make_cache(self) -> list:
        """Fresh caches for generation: one per layer that owns keys and values."""
        return caches.make_cache(self.config.text)

    def sanitize(self, weights: dict) -> dict:
        """Map checkpoint keys, in any layout checkpoints.py knows, to this module tree.

        Raises CheckpointError naming the first key that belongs nowhere.
        """
        layout = checkpoints.detect(weights)
        out, source = {}, {}
        for key, value in weights.items():
            name = layout.ours(key)
            if name is None or (name.startswith("lm_head.") and "lm_head" not in self):
                continue
            out[name], source[name] = value, key
        expected = dict(tree_flatten(self.parameters()))
        unknown = sorted(k for k in out if k not in expected)
        if unknown:
            raise CheckpointError(
                f"The checkpoint has a weight {source[unknown[0]]!r} (read as {unknown[0]!r}) that "
                f"this model does not have ({len(unknown)} unknown in all); is config.json the one "
                "that came with it?"
            )
        return out


def _isin(ids: mx.array, values: set) -> mx.array:
    hit = mx.zeros(ids.shape, dtype=mx.bool_)
    for v in values:
        hit = hit | (ids == v)
    return hit


def _left_padding(attention_mask: mx.array, batch: int, total: int):
    """Validate a (B, past + T) 0/1 mask of left padding -> (key_valid bool (B, total), pads (B,))."""
    if tuple(attention_mask.shape) != (batch, total):
        raise InputError(
            f"attention_mask must have shape {(batch, total)} (cached plus new tokens), "
            f"got {tuple(attention_mask.shape)}."
        )
    valid = attention_mask.astype(mx.bool_)
    pads = total - valid.astype(mx.int32).sum(axis=1)
    if not mx.array_equal(valid, mx.arange(total)[None] >= pads[:, None]).item():
        raise InputError("attention_mask must be left padding only: zeros first, then ones, in every row.")
    return valid, pads
