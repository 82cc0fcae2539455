"""Configuration dataclasses built from a Hugging Face `config.json`.

Two forms of the text config exist in the wild and both load:
- the form Google publishes: `global_head_dim` and `num_global_key_value_heads` describe the
  full-attention layers;
- the form transformers 5.23 writes with `save_pretrained`: a `per_layer_config` map of per-layer
  overrides (`{"5": {"head_dim": 512, "num_key_value_heads": 1}}`) instead.
Either way the result is one `LayerSpec` per decoder layer, so the model never re-derives them.
Unknown keys are tolerated (the real config carries unused Gemma 3n keys); bad values raise
`ConfigError` naming the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mlx_gemma4u.errors import ConfigError

SLIDING, FULL = "sliding_attention", "full_attention"
DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}
MODEL_TYPES = ("gemma4_unified", "gemma4_unified_text")
# The top-level config.json keys that name the media placeholder and boundary tokens' ids.
SPECIAL_TOKEN_KEYS = (
    "image_token_id",
    "video_token_id",
    "audio_token_id",
    "boi_token_id",
    "eoi_token_id",
    "boa_token_id",
    "eoa_token_index",
)


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def require_positive(name: str, value: Any) -> None:
    require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        f"config.json: {name} must be a positive integer, got {value!r}.",
    )


def dataclass_from_dict(cls, params: dict, where: str):
    """Build dataclass `cls` from the keys it knows; keys it does not know are ignored."""
    if not isinstance(params, dict):
        raise ConfigError(f"config.json: {where} must be an object, got {type(params).__name__}.")
    known = {f.name for f in fields(cls) if f.init}
    try:
        return cls(**{k: v for k, v in params.items() if k in known})
    except TypeError as e:
        raise ConfigError(f"config.json: {where} is malformed ({e}).") from None


@dataclass(frozen=True)
class LayerSpec:
    """Everything that differs between decoder layers, resolved once from the config.

    kv_mode is None (own cache), "store" (own cache, shared with later layers) or "reuse" (no k/v
    weights; reads the keys and values of layer `kv_source`).
    """

    layer_type: str
    head_dim: int
    num_kv_heads: int
    intermediate_size: int
    k_eq_v: bool
    kv_mode: str | None
    kv_source: int


@dataclass
class TextConfig:
    vocab_size: int = 262_144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    global_head_dim: int = 512
    num_global_key_value_heads: int | None = None
    per_layer_config: dict | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 262_144
    rms_norm_eps: float = 1e-6
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: int | list[int] = 1
    tie_word_embeddings: bool = True
    rope_parameters: dict | None = None
    attention_bias: bool = False
    sliding_window: int = 1024
    layer_types: list[str] | None = None
    final_logit_softcapping: float | None = None
    use_bidirectional_attention: str | None = "vision"
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    layers: list[LayerSpec] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "sliding_window",
            "global_head_dim",
            "max_position_embeddings",
        ):
            require_positive(name, getattr(self, name))
        require(
            self.hidden_activation in ("gelu_pytorch_tanh", "gelu_new"),
            f"config.json: hidden_activation {self.hidden_activation!r} is not supported "
            "(Gemma 4 uses 'gelu_pytorch_tanh').",
        )
        require(
            self.use_bidirectional_attention in (None, "vision"),
            f"config.json: use_bidirectional_attention={self.use_bidirectional_attention!r} "
            "is not supported (only None and 'vision', which Gemma 4 12B uses).",
        )
        require(
            isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0,
            f"config.json: rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}.",
        )
        require(
            self.final_logit_softcapping is None or self.final_logit_softcapping > 0,
            "config.json: final_logit_softcapping must be positive or null.",
        )
        require(
            self.pad_token_id is not None and 0 <= self.pad_token_id < self.vocab_size,
            f"config.json: pad_token_id {self.pad_token_id!r} is outside the vocabulary.",
        )
        self._resolve_layer_types()
        self._resolve_rope()
        self.layers = self._layer_specs()

    def _resolve_layer_types(self) -> None:
        n = self.num_hidden_layers
        if self.layer_types is None:
            self.layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n)]
        require(
            isinstance(self.layer_types, list) and len(self.layer_types) == n,
            f"config.json: layer_types must list {n} layer types (num_hidden_layers).",
        )
        bad = [t for t in self.layer_types if t not in (SLIDING, FULL)]
        require(not bad, f"config.json: unknown layer type {bad[:1]} in layer_types.")
        # transformers forces the last layer to full attention; so do we, to stay equal to it.
        self.layer_types = [*self.layer_types[:-1], FULL]

    def _resolve_rope(self) -> None:
        if self.rope_parameters is None:
            self.rope_parameters = DEFAULT_ROPE
        for layer_type in set(self.layer_types):
            params = self.rope_parameters.get(layer_type)
            require(isinstance(params, dict), f"config.json: rope_parameters has no entry for {layer_type}.")
            require(
                params.get("rope_type", "default") in ("default", "proportional"),
                f"config.json: rope_type {params.get('rope_type')!r} for {layer_type} is not supported "
                "(Gemma 4 uses 'default' and 'proportional').",
            )
            theta = params.get("rope_theta")
            require(
                isinstance(theta, (int, float)) and theta > 1,
                f"config.json: rope_theta for {layer_type} must be a number above 1, got {theta!r}.",
            )
            p = params.get("partial_rotary_factor", 1.0)
            require(
                isinstance(p, (int, float)) and 0 < p <= 1,
                f"config.json: partial_rotary_factor for {layer_type} must be in (0, 1], got {p!r}.",
            )

    def _overrides(self, i: int) -> dict:
        """The per-layer overrides of layer i, from whichever config form was given."""
        if self.per_layer_config is not None:
            require(isinstance(self.per_layer_config, dict), "config.json: per_layer_config must be an object.")
            return dict(self.per_layer_config.get(str(i), self.per_layer_config.get(i, {})))
        if self.layer_types[i] != FULL:
            return {}
        overrides = {"head_dim": self.global_head_dim}
        if self.attention_k_eq_v and self.num_global_key_value_heads is not None:
            overrides["num_key_value_heads"] = self.num_global_key_value_heads
        return overrides

    def _kv_modes(self) -> tuple[list[str | None], list[int]]:
        """Which layers store and which reuse keys/values (transformers' kv_sharing_modes)."""
        n, shared = self.num_hidden_layers, self.num_kv_shared_layers
        require(
            isinstance(shared, int) and 0 <= shared < n,
            f"config.json: num_kv_shared_layers must be in [0, {n}), got {shared!r}.",
        )
        modes: list[str | None] = [None] * n
        sources = list(range(n))
        first_shared = n - shared
        if shared == 0:
            return modes, sources
        store = {}
        for t in set(self.layer_types):
            producers = [i for i in range(first_shared) if self.layer_types[i] == t]
            require(
                bool(producers),
                f"config.json: the KV-shared layers include {t} layers but no "
                f"earlier layer of that type produces keys and values.",
            )
            store[t] = producers[-1]
            modes[store[t]] = "store"
        for i in range(first_shared, n):
            modes[i], sources[i] = "reuse", store[self.layer_types[i]]
        return modes, sources

    def _layer_specs(self) -> list[LayerSpec]:
        modes, sources = self._kv_modes()
        specs = []
        for i, layer_type in enumerate(self.layer_types):
            o = self._overrides(i)
            head_dim = o.get("head_dim", self.head_dim)
            kv_heads = o.get("num_key_value_heads", self.num_key_value_heads)
            require_positive(f"head_dim of layer {i}", head_dim)
            require_positive(f"num_key_value_heads of layer {i}", kv_heads)
            require(
                self.num_attention_heads % kv_heads == 0,
                f"config.json: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"the {kv_heads} key/value heads of layer {i}.",
            )
            require(head_dim % 2 == 0, f"config.json: head_dim of layer {i} must be even, got {head_dim}.")
            wide = self.use_double_wide_mlp and modes[i] == "reuse"
            specs.append(
                LayerSpec(
                    layer_type=layer_type,
                    head_dim=head_dim,
                    num_kv_heads=kv_heads,
                    intermediate_size=self.intermediate_size * (2 if wide else 1),
                    k_eq_v=self.attention_k_eq_v and layer_type == FULL,
                    kv_mode=modes[i],
                    kv_source=sources[i],
                )
            )
        for i, s in enumerate(specs):
            src = specs[s.kv_source]
            require(
                (s.head_dim, s.num_kv_heads) == (src.head_dim, src.num_kv_heads),
                f"config.json: layer {i} reuses the keys of layer {s.kv_source} but their head shapes differ.",
            )
        return specs


@dataclass
class VisionConfig:
    patch_size: int = 16
    pooling_kernel_size: int = 3
    mm_embed_dim: int = 3840
    mm_posemb_size: int = 1120
    output_proj_dims: int = 3840
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("patch_size", "pooling_kernel_size", "mm_embed_dim", "mm_posemb_size", "output_proj_dims"):
            require_positive(f"vision_config.{name}", getattr(self, name))
        require(
            self.output_proj_dims == self.mm_embed_dim,
            "config.json: vision_config.output_proj_dims must equal vision_config.mm_embed_dim.",
        )

    @property
    def model_patch_size(self) -> int:
        """Side of one merged patch in pixels (16 x 3 = 48)."""
        return self.patch_size * self.pooling_kernel_size

    @property
    def patch_values(self) -> int:
        """Values in one merged patch: 48 * 48 * 3 = 6912."""
        return self.model_patch_size**2 * 3


@dataclass
class AudioConfig:
    audio_embed_dim: int = 640
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        require_positive("audio_config.audio_embed_dim", self.audio_embed_dim)


@dataclass
class ModelConfig:
    """The whole checkpoint: text decoder plus the optional vision and audio embedders."""

    text: TextConfig
    vision: VisionConfig | None = None
    audio: AudioConfig | None = None
    model_type: str = "gemma4_unified"
    image_token_id: int = 258_880
    video_token_id: int = 258_884
    audio_token_id: int = 258_881
    boi_token_id: int = 255_999
    eoi_token_id: int = 258_882
    boa_token_id: int = 256_000
    eoa_token_index: int = 258_883
    quantization: dict | None = None

    @classmethod
    def from_dict(cls, raw: dict) -> ModelConfig:
        if not isinstance(raw, dict):
            raise ConfigError("config.json must hold a JSON object.")
        model_type = raw.get("model_type")
        require(
            model_type in MODEL_TYPES,
            f"config.json: model_type {model_type!r} is not a Gemma 4 Unified model "
            f"(expected one of {', '.join(MODEL_TYPES)}).",
        )
        quantization = raw.get("quantization")
        if model_type == "gemma4_unified_text":  # a text-only Gemma4UnifiedForCausalLM checkpoint
            return cls(
                text=dataclass_from_dict(TextConfig, raw, "the text config"),
                model_type=model_type,
                quantization=quantization,
            )
        require("text_config" in raw, "config.json: text_config is missing.")
        ids = {k: raw[k] for k in SPECIAL_TOKEN_KEYS if raw.get(k) is not None}
        config = cls(
            text=dataclass_from_dict(TextConfig, raw["text_config"], "text_config"),
            vision=dataclass_from_dict(VisionConfig, raw["vision_config"], "vision_config")
            if raw.get("vision_config")
            else None,
            audio=dataclass_from_dict(AudioConfig, raw["audio_config"], "audio_config")
            if raw.get("audio_config")
            else None,
            model_type=model_type,
            quantization=quantization,
            **ids,
        )
        for name, value in ids.items():
            require(
                isinstance(value, int) and 0 <= value < config.text.vocab_size,
                f"config.json: {name} {value!r} is outside the vocabulary of {config.text.vocab_size}.",
            )
        return config

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        return cls.from_dict(read_config(Path(path), "a model folder"))


def read_config(path: Path, folder: str) -> object:
    """The parsed config.json at `path` (a model's or a drafter's: `folder` names which, for the error)."""
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: {folder} needs a config.json.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not readable JSON ({e}).") from None
