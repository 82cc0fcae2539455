"""The built-in demo checkpoint: random weights, real layout, real tokenizer, no download.

Every command takes `--demo` so a fresh machine can run the whole pipeline at once. The demo has
the key names and config schema of google/gemma-4-12B-it, tiny sizes, the real 262,144-token
vocabulary and Google's real Gemma 4 tokenizer (bundled, Apache-2.0). Its weights are random with
a fixed seed: **it produces nonsense**, and says so wherever it is used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .checkpoints import TRANSFORMERS
from .config import ModelConfig
from .files import replacing_folder
from .model import Model
from .tokenizer_files import write_tokenizer_files

VERSION = 1
WARNING = "Demo checkpoint: random weights, so its output is nonsense. Use it to try the tools, not the model."

CONFIG = {
    "architectures": ["Gemma4UnifiedForConditionalGeneration"],
    "model_type": "gemma4_unified",
    "dtype": "bfloat16",
    "mlx_gemma4u_demo": WARNING,
    "text_config": {
        "model_type": "gemma4_unified_text",
        "vocab_size": 262144,
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "global_head_dim": 32,
        "num_global_key_value_heads": 1,
        "attention_k_eq_v": True,
        "num_kv_shared_layers": 0,
        "use_double_wide_mlp": False,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6,
        "sliding_window": 128,
        "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
        },
        "final_logit_softcapping": 30.0,
        "use_bidirectional_attention": "vision",
        "max_position_embeddings": 262144,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "hidden_size_per_layer_input": 0,
        "enable_moe_block": False,
    },
    "vision_config": {
        "model_type": "gemma4_unified_vision",
        "patch_size": 16,
        "pooling_kernel_size": 3,
        "mm_embed_dim": 64,
        "mm_posemb_size": 1120,
        "output_proj_dims": 64,
        "rms_norm_eps": 1e-6,
        "num_soft_tokens": 280,
    },
    "audio_config": {"model_type": "gemma4_unified_audio", "audio_embed_dim": 640, "rms_norm_eps": 1e-6},
    "image_token_id": 258880,
    "video_token_id": 258884,
    "audio_token_id": 258881,
    "boi_token_id": 255999,
    "eoi_token_id": 258882,
    "boa_token_id": 256000,
    "eoa_token_index": 258883,
    "tie_word_embeddings": True,
}
GENERATION_CONFIG = {"bos_token_id": 2, "eos_token_id": [1, 106, 50], "pad_token_id": 0}
MODEL_CARD = f"""# mlx-gemma4u demo checkpoint (version {VERSION})

**{WARNING}**

Layout, key names and config schema follow google/gemma-4-12B-it, at tiny sizes (hidden 64,
6 layers) with the real 262,144-token vocabulary. The tokenizer is Google's real Gemma 4 tokenizer
(Apache-2.0). Made by `mlx_gemma4u.demo.ensure_demo()`.
"""


def default_path() -> Path:
    """Where the demo lives: $MLX_GEMMA4U_HOME, else the user cache folder."""
    home = os.environ.get("MLX_GEMMA4U_HOME")
    root = Path(home) if home else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlx-gemma4u"
    return root / f"demo-v{VERSION}"


def ensure_demo(path: Path | None = None) -> Path:
    """The demo folder, written first if it is not there yet (atomically: all of it or none)."""
    path = Path(path) if path else default_path()
    if not (path / "config.json").is_file():
        with replacing_folder(path) as staging:
            write_demo(staging)
    return path


def write_demo(out: Path) -> None:
    """Write the demo checkpoint files into the (empty) folder `out`."""
    write_checkpoint(out, CONFIG)
    (out / "README.md").write_text(MODEL_CARD)


def write_checkpoint(out: Path, config: dict) -> None:
    """A random-weight checkpoint of `config` in transformers' layout: config.json,
    generation_config.json, the bundled tokenizer's files and bfloat16 safetensors."""
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    write_tokenizer_files(out)
    mx.save_safetensors(str(out / "model.safetensors"), random_weights(config), metadata={"format": "pt"})


def random_weights(config: dict) -> dict[str, mx.array]:
    """N(0, 0.02) bfloat16 matrices (fixed seed) under transformers' on-disk names; norms and layer
    scalars are 1, biases 0."""
    model = Model(ModelConfig.from_dict(config))
    key = mx.random.key(0)
    weights = {}
    for name, param in tree_flatten(model.parameters()):
        key, sub = mx.random.split(key)
        if param.ndim == 1:
            value = mx.zeros(param.shape) if name.endswith("bias") else mx.ones(param.shape)
        else:
            value = 0.02 * mx.random.normal(param.shape, key=sub)
        weights[TRANSFORMERS.stored(name)] = value.astype(mx.bfloat16)
    return weights
