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
from pathlib import Path

from mlx_gemma4u.files import replacing_folder
from mlx_gemma4u.weights.demo import CONFIG as DEMO_CONFIG
from mlx_gemma4u.weights.demo import ensure_demo, write_checkpoint

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


MID = variant(
    dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        global_head_dim=512,
        sliding_window=1024,
        layer_types=[S] * 5 + [F],
    ),
    vision_dim=1024,
)
REAL_12B_2L = variant(
    dict(
        hidden_size=3840,
        intermediate_size=15360,
        num_hidden_layers=2,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        global_head_dim=512,
        sliding_window=1024,
        layer_types=[S, F],
    ),
    vision_dim=3840,
)
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
