"""The three random checkpoints the comparison runs on, written once into a cache folder.

Each is a Hugging Face folder (config.json in the real schema, transformers' on-disk key names,
bfloat16 safetensors, the demo's tokenizer files), so this package, mlx-vlm and transformers all
load the very same files:

    demo      the built-in demo checkpoint (hidden 64, 6 layers, real vocabulary)
    mid       real vocabulary (262,144) and head dims (256 sliding, 512 global), hidden 1024, 6 layers
    12b-2l    the real 12B layer shapes (hidden 3840, MLP 15360, real vision embedder) cut to 2 layers:
              one sliding and one global layer, so both attention shapes are measured
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_gemma4u.config import ModelConfig
from mlx_gemma4u.demo import CONFIG as DEMO_CONFIG
from mlx_gemma4u.demo import GENERATION_CONFIG, checkpoint_name, ensure_demo
from mlx_gemma4u.files import replacing_folder
from mlx_gemma4u.model import Model
from mlx_gemma4u.tokenizer_files import write_tokenizer_files

S, F = "sliding_attention", "full_attention"
VERSION = 1
NOTE = "mlx-gemma4u benchmark checkpoint: random weights, for timing only."


def variant(text: dict, vision_dim: int) -> dict:
    """The demo config with its text config updated and the vision width set to `vision_dim`."""
    config = copy.deepcopy(DEMO_CONFIG)
    config.pop("mlx_gemma4u_demo")
    config["mlx_gemma4u_bench"] = NOTE
    config["text_config"].update(text)
    config["vision_config"].update(mm_embed_dim=vision_dim, output_proj_dims=vision_dim)
    return config


MID = variant(dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=6, num_attention_heads=8,
                   num_key_value_heads=4, head_dim=256, global_head_dim=512, sliding_window=1024,
                   layer_types=[S] * 5 + [F]), vision_dim=1024)
REAL_12B_2L = variant(dict(hidden_size=3840, intermediate_size=15360, num_hidden_layers=2, num_attention_heads=16,
                           num_key_value_heads=8, head_dim=256, global_head_dim=512, sliding_window=1024,
                           layer_types=[S, F]), vision_dim=3840)
SIZES = {"demo": None, "mid": MID, "12b-2l": REAL_12B_2L}


def ensure_checkpoint(size: str, root: Path) -> Path:
    """The folder of checkpoint `size` under `root`, written first (atomically) if missing."""
    path = Path(root) / f"{size}-v{VERSION}"
    if SIZES[size] is None:
        return ensure_demo(path)
    if not (path / "config.json").is_file():
        with replacing_folder(path) as staging:
            write_checkpoint(staging, SIZES[size])
    return path


def write_checkpoint(out: Path, config: dict, seed: int = 0) -> None:
    """config.json, generation_config.json, tokenizer files and random bfloat16 weights into `out`."""
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    write_tokenizer_files(out)
    mx.save_safetensors(str(out / "model.safetensors"), random_weights(config, seed), metadata={"format": "pt"})


def random_weights(config: dict, seed: int) -> dict[str, mx.array]:
    """N(0, 0.02) matrices and unit norms under transformers' names, in bfloat16."""
    model = Model(ModelConfig.from_dict(config))
    key = mx.random.key(seed)
    weights = {}
    for name, param in tree_flatten(model.parameters()):
        key, sub = mx.random.split(key)
        if param.ndim == 1:
            value = mx.zeros(param.shape) if name.endswith("bias") else mx.ones(param.shape)
        else:
            value = 0.02 * mx.random.normal(param.shape, key=sub)
        weights[checkpoint_name(name)] = value.astype(mx.bfloat16)
    return weights
