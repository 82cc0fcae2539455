"""Gemma 4's multi-token-prediction assistant (Gemma4UnifiedAssistantForCausalLM): the drafter.

One draft step, at the constant position P of the last token the target has not run yet:

    concat(target embedding of the last token (1, 1, Dt), a hidden state (1, 1, Dt))
        --pre_projection--> (1, 1, D) --layers (every one KV-shared: queries only, attending to
        the target's cached keys and values of the last layer of each type, positions < P)-->
        --final norm--> h --tied head, or the centroid head--> (1, 1, vocab) draft logits
                          h --post_projection--> (1, 1, Dt) the hidden state of the next step

The first step of a round takes the target's final-normed hidden state at the position that
predicted the last token; later steps take the previous step's projected state. A sliding layer
sees the last `sliding_window` keys before P plus one (transformers' bidirectional window, flipped
to look back). The centroid head ("ordered embeddings") scores only the tokens of the top-k
centroids (`token_ordering` lists the vocabulary grouped by centroid) and gives every other token
the lowest selected logit minus one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_gemma4u.errors import CheckpointError, ConfigError, InputError
from mlx_gemma4u.models import parallel
from mlx_gemma4u.models.config import FULL, TextConfig, dataclass_from_dict, read_config, require, require_positive
from mlx_gemma4u.models.decoder import RowSteps, Step, TextModel

MODEL_TYPE = "gemma4_unified_assistant"


@dataclass
class DraftConfig:
    """An assistant's config.json: its own (small) text decoder and how it meets the target."""

    text: TextConfig
    backbone_hidden_size: int = 3840
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    quantization: dict | None = None  # a converted folder's (mlx-gemma4u convert -q): how its layers were quantized

    def __post_init__(self) -> None:
        for name in ("backbone_hidden_size", "num_centroids", "centroid_intermediate_top_k"):
            require_positive(name, getattr(self, name))
        if self.use_ordered_embeddings:
            require(
                self.text.vocab_size % self.num_centroids == 0,
                f"config.json: num_centroids ({self.num_centroids}) must divide the vocabulary "
                f"({self.text.vocab_size}).",
            )
            require(
                self.centroid_intermediate_top_k <= self.num_centroids,
                "config.json: centroid_intermediate_top_k exceeds num_centroids.",
            )
        # Every assistant layer reads the target's keys and values: none computes its own.
        wide = 2 if self.text.use_double_wide_mlp else 1
        self.text.layers = [
            dataclasses.replace(s, kv_mode="reuse", kv_source=-1, intermediate_size=self.text.intermediate_size * wide)
            for s in self.text.layers
        ]

    @classmethod
    def from_dict(cls, raw: dict) -> DraftConfig:
        if not isinstance(raw, dict):
            raise ConfigError("config.json must hold a JSON object.")
        require(
            raw.get("model_type") == MODEL_TYPE,
            f"config.json: model_type {raw.get('model_type')!r} is not a Gemma 4 assistant (drafter) "
            f"checkpoint (expected {MODEL_TYPE!r}).",
        )
        require(isinstance(raw.get("text_config"), dict), "config.json: text_config is missing.")
        # The layer specs are rebuilt as all-"reuse" above; the count only passes TextConfig's checks.
        text = dataclass_from_dict(TextConfig, {**raw["text_config"], "num_kv_shared_layers": 0}, "text_config")
        known = {f.name for f in dataclasses.fields(cls)} - {"text"}
        return cls(text=text, **{k: v for k, v in raw.items() if k in known})

    @classmethod
    def from_file(cls, path: Path) -> DraftConfig:
        return cls.from_dict(read_config(path, "a drafter folder"))


class CentroidHead(nn.Module):
    """The "ordered embeddings" head: (B, L, D) -> (B, L, vocab) logits of the top-k centroids' tokens."""

    def __init__(self, config: DraftConfig):
        super().__init__()
        self.top_k = config.centroid_intermediate_top_k
        self.centroids = nn.Linear(config.text.hidden_size, config.num_centroids, bias=False)
        self.token_ordering = mx.zeros((config.text.vocab_size,), dtype=mx.int32)

    def __call__(self, h: mx.array, table: nn.Module) -> mx.array:
        """h (B, L, D), table: the tied embedding (plain or quantized) whose rows are the head's."""
        B, L, _ = h.shape
        scores = self.centroids(h)
        top = mx.argpartition(-scores, kth=self.top_k - 1, axis=-1)[..., : self.top_k]  # (B, L, k): a set
        groups = self.token_ordering.reshape(self.centroids.weight.shape[0], -1)
        ids = groups[top].reshape(B, L, -1)  # (B, L, k * tokens per centroid)
        rows = table(ids)  # (B, L, n, D)
        selected = (rows @ h[..., None]).squeeze(-1).astype(h.dtype)  # (B, L, n)
        floor = selected.min(axis=-1, keepdims=True) - 1  # per row, so rows drafting together do not mix
        out = mx.broadcast_to(floor, (B, L, table.weight.shape[0]))
        return mx.put_along_axis(out, ids, selected, axis=-1)


class DraftModel(nn.Module):
    def __init__(self, config: DraftConfig):
        super().__init__()
        self.config = config
        D, Dt = config.text.hidden_size, config.backbone_hidden_size
        self.model = TextModel(config.text)
        self.pre_projection = nn.Linear(2 * Dt, D, bias=False)
        self.post_projection = nn.Linear(D, Dt, bias=False)
        if config.use_ordered_embeddings:
            self.masked_embedding = CentroidHead(config)

    def attend_to(self, shared_kv: dict, position: int) -> Step:
        """The Step of a drafting round: the target's caches by layer type (Model.shared_kv, holding
        exactly the positions < `position`) and the constant query position."""
        step = Step(position, lambda *_: None)
        for layer_type, cache in shared_kv.items():
            # a sliding query of the drafter sees the last W + 1 cached keys
            last = (self.config.text.sliding_window + 1,) if layer_type != FULL else ()
            step.shared[layer_type] = (*cache.keys_and_values(*last), cache)
        return step

    def __call__(self, token_embedding: mx.array, hidden: mx.array, step: Step) -> tuple[mx.array, mx.array]:
        """(1, 1, Dt) target embedding of the last token, (1, 1, Dt) hidden state -> (1, 1, vocab)
        draft logits and the (1, 1, Dt) projected hidden state for the next draft step."""
        x = self.pre_projection(mx.concatenate([token_embedding, hidden.astype(token_embedding.dtype)], axis=-1))
        h = self.model(x, step)
        table = self.model.embed_tokens
        logits = self.masked_embedding(h, table) if "masked_embedding" in self else table.as_linear(h)
        return logits, self.post_projection(h)

    def draft(self, target, shared_kvs: list[dict], tokens: mx.array, hidden: mx.array, k: int) -> mx.array:
        """k greedy draft tokens (B, k) for each of B sequences: tokens (B,) their last tokens, not yet
        in the target's caches (shared_kvs: each row's Model.shared_kv); hidden (B, 1, Dt): the
        target's final-normed hidden states that predicted them. Rows draft together through every
        Linear (decoder.RowSteps), each attending to its own keys. Left unevaluated, so the k steps
        run as one graph. On a pipeline stage (parallel.py) the process holding the keys drafts and
        the others receive its drafts."""
        stage = target.language_model.stage
        if stage is None or stage.rank == stage.drafter_rank:
            drafts = self._draft(target, shared_kvs, tokens, hidden, k)
        else:
            drafts = mx.zeros((tokens.shape[0], k), mx.int32)
        return drafts if stage is None else stage.from_rank(drafts, stage.drafter_rank)

    def _draft(self, target, shared_kvs: list[dict], tokens: mx.array, hidden: mx.array, k: int) -> mx.array:
        steps = [self.attend_to(kv, next(iter(kv.values())).offset) for kv in shared_kvs]
        step = steps[0] if len(steps) == 1 else RowSteps(steps)
        drafts = []
        for _ in range(k):
            logits, hidden = self(target.language_model.embed(tokens[:, None]), hidden, step)
            tokens = mx.argmax(logits[:, 0], axis=-1).astype(mx.int32)
            drafts.append(tokens)
        return mx.stack(drafts, axis=1)

    def split_like(self, target) -> None:
        """Split this drafter as `target` is split. Tensor parallel: its heads and MLP across the
        target's group (it attends to the key-value heads each rank holds); a pipeline: nothing."""
        if target.group is not None and target.language_model.stage is None:
            parallel.shard(self.model, target.group)

    def check_target(self, target) -> None:
        """Refuse, in one sentence, a target model this drafter was not made for: it reads the target's
        hidden state, token ids and cached keys, so another hidden size, vocabulary or key shape would
        otherwise fail deep inside a matmul (`--draft-model demo` with a real model, say)."""
        text, theirs = self.config.text, target.config.text
        for what, mine, its in (
            ("hidden size", self.config.backbone_hidden_size, theirs.hidden_size),
            ("vocabulary size", text.vocab_size, theirs.vocab_size),
        ):
            if mine != its:
                raise InputError(
                    f"This drafter does not fit the model: it was made for a {what} of {mine}, the "
                    f"model's is {its}; pass the assistant made for this model."
                )
        stage = target.language_model.stage
        if stage is not None and stage.drafter_rank is None:
            raise InputError(
                "A drafter reads the keys of the last full and sliding layers, which this pipeline "
                "split puts on different processes; use fewer processes."
            )
        owners = {s.layer_type: s for s in theirs.layers if s.kv_mode != "reuse"}  # the last of each type
        for spec in text.layers:
            owner = owners.get(spec.layer_type)
            if owner is None or owner.head_dim != spec.head_dim or text.num_attention_heads % owner.num_kv_heads:
                raise InputError(
                    f"This drafter does not fit the model: its {spec.layer_type} queries "
                    f"({text.num_attention_heads} heads of {spec.head_dim}) cannot attend to the "
                    "model's cached keys; pass the assistant made for this model."
                )

    def sanitize(self, weights: dict) -> dict:
        """Checkpoint keys (transformers' names are ours) -> ours; the tied lm_head is dropped.
        Raises CheckpointError naming the first key that belongs nowhere."""
        out = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
        if "masked_embedding.token_ordering" in out:
            out["masked_embedding.token_ordering"] = out["masked_embedding.token_ordering"].astype(mx.int32)
        expected = dict(tree_flatten(self.parameters()))
        unknown = sorted(k for k in out if k not in expected)
        if unknown:
            raise CheckpointError(
                f"The drafter checkpoint has a weight {unknown[0]!r} that this drafter does not "
                f"have ({len(unknown)} unknown in all); is config.json the one that came with it?"
            )
        return out
