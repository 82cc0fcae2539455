"""Adapter folders: adapter_config.json and adapters.safetensors, in mlx-lm's layout.

    {"fine_tune_type": "lora", "num_layers": 16,
     "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0, "keys": [...]}, ...training settings}

The folder is written atomically as a whole (a new folder renamed into place), so a killed run
leaves the last complete save; reading checks every tensor's name and shape before any is set.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_gemma4u.errors import CheckpointError, InputError
from mlx_gemma4u.files import replacing_folder
from mlx_gemma4u.models import lora
from mlx_gemma4u.weights.headers import check_safetensors

CONFIG, WEIGHTS = "adapter_config.json", "adapters.safetensors"


def save_adapters(folder: str | Path, model, config: lora.AdapterConfig, extra: dict | None = None) -> Path:
    """Write the model's adapter weights and `config` (plus `extra` settings) as the folder `folder`,
    both files at once (a new folder renamed into place) -> its path."""
    folder = Path(folder)
    with replacing_folder(folder) as staging:
        mx.save_safetensors(str(staging / WEIGHTS), lora.adapter_weights(model))
        (staging / CONFIG).write_text(json.dumps({**(extra or {}), **config_json(config)}, indent=1))
    return folder


def config_json(config: lora.AdapterConfig) -> dict:
    parameters = {k: v for k, v in asdict(config).items() if k not in ("fine_tune_type", "num_layers")}
    parameters["keys"] = list(config.keys)
    return {"fine_tune_type": config.fine_tune_type, "num_layers": config.num_layers, "lora_parameters": parameters}


def read_config(folder: str | Path) -> lora.AdapterConfig:
    """The AdapterConfig of an adapter folder (or of the folder of its weights file), refused in one
    sentence if missing or malformed."""
    folder = Path(folder)
    folder = folder.parent if folder.is_file() else folder
    path = folder / CONFIG
    if not path.is_file():
        raise InputError(f"{folder} is not an adapter folder (it has no {CONFIG}).")
    try:
        data = json.loads(path.read_text())
        parameters = dict(data.get("lora_parameters", {}))
        known = {f.name for f in fields(lora.AdapterConfig)}
        settings = {k: v for k, v in parameters.items() if k in known}
        if "keys" in settings:
            settings["keys"] = tuple(settings["keys"])
        return lora.AdapterConfig(
            fine_tune_type=data.get("fine_tune_type", "lora"), num_layers=data.get("num_layers", 16), **settings
        )
    except (ValueError, TypeError, AttributeError) as error:
        raise InputError(f"{path} is not a readable adapter config: {error}") from None


def load_adapters(model, folder: str | Path):
    """Swap in the adapters of `folder` and set their weights -> the model (in place, frozen)."""
    lora.apply(model, read_config(folder))
    load_adapter_weights(model, folder)
    model.eval()
    return model


def load_adapter_weights(model, path: str | Path) -> int:
    """Set the adapters already swapped into `model` from an adapter folder (or its weights file),
    each weight checked by name and shape first -> the training step they were saved at (0 if
    the folder does not say)."""
    path = Path(path)
    file, folder = (path, path.parent) if path.is_file() else (path / WEIGHTS, path)
    if not file.is_file():
        raise InputError(f"{folder} has no {WEIGHTS}; was the training run saved?")
    check_safetensors(file)
    weights = mx.load(str(file))
    expected = dict(tree_flatten(model.trainable_parameters()))
    for name, value in weights.items():
        if name not in expected:
            raise CheckpointError(f"{file} has a weight {name!r} that this model's adapters do not have.")
        if tuple(value.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{file} has {name!r} of shape {tuple(value.shape)}, the model's adapter is "
                f"{tuple(expected[name].shape)}: adapters trained for another model?"
            )
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise CheckpointError(f"{file} lacks the adapter weight {missing[0]!r} ({len(missing)} missing in all).")
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    config = folder / CONFIG
    return int(json.loads(config.read_text()).get("iteration", 0)) if config.is_file() else 0
