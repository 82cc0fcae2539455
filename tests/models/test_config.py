"""config.json -> dataclasses: both published forms, derived per-layer values, clear errors."""

import json

import pytest
import reference
from transformers import Gemma4UnifiedTextConfig

from mlx_gemma4u.errors import ConfigError
from mlx_gemma4u.models.config import FULL, SLIDING, ModelConfig, TextConfig


@pytest.mark.parametrize("name", list(reference.TEXT_CONFIGS))
def test_layer_specs_equal_transformers(name):
    text = {**reference.BASE_TEXT, **reference.TEXT_CONFIGS[name]}
    hf = Gemma4UnifiedTextConfig(**text)
    ours = TextConfig(**{k: v for k, v in text.items()})
    assert ours.layer_types == hf.layer_types
    modes = hf.kv_sharing_modes
    for i, spec in enumerate(ours.layers):
        layer = hf.per_layer_config[i]
        assert (spec.head_dim, spec.num_kv_heads) == (layer.head_dim, layer.num_key_value_heads), i
        assert spec.kv_mode == modes[i], i


def test_both_config_forms_load_the_same(hf_checkpoints):
    for name in reference.TEXT_CONFIGS:
        saved = ModelConfig.from_file(hf_checkpoints[name][1] / "config.json")
        published = ModelConfig.from_file(hf_checkpoints[f"{name}-published"][1] / "config.json")
        assert saved.text.layers == published.text.layers, name
    raw = json.loads((hf_checkpoints["full-published"][1] / "config.json").read_text())
    assert "per_layer_config" not in raw["text_config"] and raw["text_config"]["global_head_dim"] == 32


def test_published_12b_shapes():
    text = ModelConfig.from_dict(
        {
            "model_type": "gemma4_unified",
            "text_config": dict(
                hidden_size=3840,
                intermediate_size=15360,
                num_hidden_layers=48,
                num_attention_heads=16,
                num_key_value_heads=8,
                head_dim=256,
                global_head_dim=512,
                num_global_key_value_heads=1,
                attention_k_eq_v=True,
                final_logit_softcapping=30.0,
                hidden_size_per_layer_input=0,
                enable_moe_block=False,
            ),
        }
    ).text
    full = [i for i, s in enumerate(text.layers) if s.layer_type == FULL]
    assert full == [5, 11, 17, 23, 29, 35, 41, 47]
    assert {(s.head_dim, s.num_kv_heads, s.k_eq_v) for s in text.layers if s.layer_type == FULL} == {(512, 1, True)}
    assert {(s.head_dim, s.num_kv_heads, s.k_eq_v) for s in text.layers if s.layer_type == SLIDING} == {(256, 8, False)}


def test_last_layer_forced_full_and_kv_sharing_checked():
    assert TextConfig(num_hidden_layers=3, layer_types=[SLIDING] * 3).layer_types[-1] == FULL
    with pytest.raises(ConfigError, match="no earlier layer"):
        TextConfig(num_hidden_layers=3, layer_types=[SLIDING, SLIDING, FULL], num_kv_shared_layers=1)


@pytest.mark.parametrize(
    "text, needle",
    [
        ({"hidden_size": -1}, "hidden_size"),
        ({"num_attention_heads": 3, "num_key_value_heads": 2}, "multiple"),
        ({"layer_types": ["sliding_attention"]}, "layer_types"),
        ({"layer_types": ["cross_attention"] * 30}, "unknown layer type"),
        (
            {"rope_parameters": {SLIDING: {"rope_type": "yarn", "rope_theta": 1e4}, FULL: {"rope_theta": 1e6}}},
            "rope_type",
        ),
        ({"hidden_activation": "relu"}, "hidden_activation"),
        ({"use_bidirectional_attention": "all"}, "use_bidirectional_attention"),
        ({"rms_norm_eps": "tiny"}, "rms_norm_eps"),
        ({"head_dim": 15}, "even"),
    ],
)
def test_bad_text_values_are_named(text, needle):
    with pytest.raises(ConfigError, match=needle):
        ModelConfig.from_dict({"model_type": "gemma4_unified", "text_config": text})


def test_bad_top_level_values_are_named(tmp_path):
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        ModelConfig.from_dict({"model_type": "llama"})
    with pytest.raises(ConfigError, match="image_token_id"):
        ModelConfig.from_dict(
            {"model_type": "gemma4_unified", "text_config": {"vocab_size": 100}, "image_token_id": 258880}
        )
    with pytest.raises(ConfigError, match="output_proj_dims"):
        ModelConfig.from_dict(
            {
                "model_type": "gemma4_unified",
                "text_config": {},
                "vision_config": {"mm_embed_dim": 48, "output_proj_dims": 64},
            }
        )
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        ModelConfig.from_file(tmp_path / "config.json")


def test_text_only_causal_lm_config():
    config = ModelConfig.from_dict({"model_type": "gemma4_unified_text", "num_hidden_layers": 2, "unknown_key": 1})
    assert config.vision is None and config.audio is None and len(config.text.layers) == 2
