"""The built-in demo checkpoint: random weights, real layout, real tokenizer, no download.

Every command takes `--demo` so a fresh machine can run the whole pipeline at once. The demo has
the key names and config schema of google/gemma-4-12B-it, tiny sizes, the real 262,144-token
vocabulary and Google's real Gemma 4 tokenizer (bundled, Apache-2.0). Its weights are random with
a fixed seed: **it produces nonsense**, and says so wherever it is used.

Beside it lives the demo drafter (`--draft-model demo`): an MTP assistant in the layout of
google/gemma-4-12B-it-assistant, matched to the demo (its hidden size, vocabulary, heads, window
and RoPE; every layer reads the demo's keys and values), with random weights: its drafts are
nonsense and almost never accepted, so it only shows speculative decoding at work (the reply is
the demo's own, token for token).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_gemma4u.files import replacing_folder
from mlx_gemma4u.models.config import ModelConfig
from mlx_gemma4u.models.drafter import DraftConfig, DraftModel
from mlx_gemma4u.models.layouts import TRANSFORMERS
from mlx_gemma4u.models.model import Model
from mlx_gemma4u.weights.tokenizer_files import write_tokenizer_files

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
DRAFTER_WARNING = (
    "Demo drafter: random weights, so its drafts are nonsense and almost never accepted. Use it "
    "to try --draft-model on --demo; the reply stays the demo's own."
)
DRAFTER_CONFIG = {
    "architectures": ["Gemma4UnifiedAssistantForCausalLM"],
    "model_type": "gemma4_unified_assistant",
    "dtype": "bfloat16",
    "mlx_gemma4u_demo": DRAFTER_WARNING,
    "backbone_hidden_size": CONFIG["text_config"]["hidden_size"],
    "use_ordered_embeddings": False,
    "tie_word_embeddings": True,
    # The demo's vocabulary, heads, window and RoPE: the drafter's queries meet the demo's cached keys.
    "text_config": {
        **CONFIG["text_config"],
        "hidden_size": 32,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
        "num_kv_shared_layers": 4,  # all of them: every layer reads the demo's keys and values
        "final_logit_softcapping": None,
        "use_bidirectional_attention": None,
    },
}
GENERATION_CONFIG = {"bos_token_id": 2, "eos_token_id": [1, 106, 50], "pad_token_id": 0}
MODEL_CARD = f"""# mlx-gemma4u demo checkpoint (version {VERSION})

**{WARNING}**

Layout, key names and config schema follow google/gemma-4-12B-it, at tiny sizes (hidden 64,
6 layers) with the real 262,144-token vocabulary. The tokenizer is Google's real Gemma 4 tokenizer
(Apache-2.0). Made by `mlx_gemma4u.weights.demo.ensure_demo()`.
"""


DRAFTER_CARD = f"""# mlx-gemma4u demo drafter (version {VERSION})

**{DRAFTER_WARNING}**

Layout, key names and config schema follow google/gemma-4-12B-it-assistant (the MTP drafter), at
tiny sizes (hidden 32, 4 layers) matched to the mlx-gemma4u demo checkpoint. Made by
`mlx_gemma4u.weights.demo.ensure_demo_drafter()`.
"""


def home() -> Path:
    """Where the demo checkpoint and drafter live: $MLX_GEMMA4U_HOME, else the user cache folder."""
    root = os.environ.get("MLX_GEMMA4U_HOME")
    return Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlx-gemma4u"


def default_path() -> Path:
    """The demo checkpoint's folder."""
    return home() / f"demo-v{VERSION}"


def drafter_path() -> Path:
    """The demo drafter's folder, beside the demo's."""
    return home() / f"demo-drafter-v{VERSION}"


def ensure_demo(path: Path | None = None) -> Path:
    """The demo folder, written first if it is not there yet (atomically: all of it or none)."""
    return _ensure(Path(path) if path else default_path(), write_demo)


def ensure_demo_drafter(path: Path | None = None) -> Path:
    """The demo drafter's folder, written first if it is not there yet (atomically, as the demo's)."""
    return _ensure(Path(path) if path else drafter_path(), write_demo_drafter)


def _ensure(path: Path, write) -> Path:
    if not (path / "config.json").is_file():
        with replacing_folder(path) as staging:
            write(staging)
    return path


def write_demo(out: Path) -> None:
    """Write the demo checkpoint files into the (empty) folder `out`."""
    write_checkpoint(out, CONFIG)
    (out / "README.md").write_text(MODEL_CARD)


def write_demo_drafter(out: Path) -> None:
    """Write the demo drafter's files into the (empty) folder `out`: config.json, bfloat16
    safetensors under the assistant's names (which are our module paths), the model card."""
    (out / "config.json").write_text(json.dumps(DRAFTER_CONFIG, indent=2))
    drafter = DraftModel(DraftConfig.from_dict(DRAFTER_CONFIG))
    mx.save_safetensors(str(out / "model.safetensors"), _random(drafter), metadata={"format": "pt"})
    (out / "README.md").write_text(DRAFTER_CARD)


def write_checkpoint(out: Path, config: dict) -> None:
    """A random-weight checkpoint of `config` in transformers' layout: config.json,
    generation_config.json, the bundled tokenizer's files and bfloat16 safetensors."""
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    write_tokenizer_files(out)
    mx.save_safetensors(str(out / "model.safetensors"), random_weights(config), metadata={"format": "pt"})


def random_weights(config: dict) -> dict[str, mx.array]:
    """The random weights of a Model of `config` under transformers' on-disk names (see _random)."""
    return {TRANSFORMERS.stored(name): value for name, value in _random(Model(ModelConfig.from_dict(config))).items()}


def _random(module) -> dict[str, mx.array]:
    """N(0, 0.02) bfloat16 matrices (fixed seed) under the module's parameter paths; norms and layer
    scalars are 1, biases 0."""
    key = mx.random.key(0)
    weights = {}
    for name, param in tree_flatten(module.parameters()):
        key, sub = mx.random.split(key)
        if param.ndim == 1:
            value = mx.zeros(param.shape) if name.endswith("bias") else mx.ones(param.shape)
        else:
            value = 0.02 * mx.random.normal(param.shape, key=sub)
        weights[name] = value.astype(mx.bfloat16)
    return weights
