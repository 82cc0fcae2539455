"""Local folder or Hugging Face repo -> validated safetensors -> model (and its processor).

Only safetensors are read, and every file's header is checked before anything is allocated, so a
truncated or hostile file fails with one sentence instead of a crash deep inside MLX. Nothing in
a checkpoint is ever executed.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_gemma4u.backends import cpu_cores
from mlx_gemma4u.errors import CheckpointError, DownloadError, MemoryLimitError
from mlx_gemma4u.models import layouts as checkpoints
from mlx_gemma4u.models.config import ModelConfig
from mlx_gemma4u.models.drafter import DraftConfig, DraftModel
from mlx_gemma4u.models.model import Model
from mlx_gemma4u.weights.adapters import load_adapters
from mlx_gemma4u.weights.headers import FLOAT_DTYPES, SAFETENSORS_DTYPES, check_safetensors

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def resolve(path_or_repo: str | os.PathLike) -> Path:
    """A local model folder as is; "demo" (when no such folder exists) the built-in demo checkpoint,
    written first if needed; otherwise a Hugging Face repo id, downloaded (or found in the cache)."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if str(path_or_repo) == "demo":
        from mlx_gemma4u.weights.demo import ensure_demo

        return ensure_demo()
    repo = str(path_or_repo)
    if path.exists() or repo.count("/") != 1 or repo.startswith((".", "/", "~")):
        raise CheckpointError(f"{repo} is not a model folder, nor a Hugging Face repo id like 'google/gemma-4-12B-it'.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]))
    except Exception as e:  # the hub client raises many types: offline, 404, gated, disk full
        raise DownloadError(
            f"Could not download {repo} from the Hugging Face hub ({type(e).__name__}); check the repo id and your "
            "network, log in with `hf auth login` for gated repos, or pass a local folder."
        ) from e


def load(
    path_or_repo: str | os.PathLike,
    vision_mask: str = "gemma4",
    dtype: str | None = None,
    check_memory: bool = True,
    adapter_path: str | os.PathLike | None = None,
):
    """Load a checkpoint -> (model, processor).

    vision_mask: "gemma4" (default) or "hf-forward", see masks.py. dtype: cast floating weights
    ("float32", "float16", "bfloat16"); by default they stay as stored. check_memory: refuse
    weights larger than the machine's memory instead of swapping. adapter_path: a folder of LoRA
    adapters (`mlx-gemma4u lora`) to add to the model.
    """
    path = resolve(path_or_repo)
    with ThreadPoolExecutor(1) as pool:  # the tokenizer (about 1 s to parse) loads while the weights do
        processor = pool.submit(load_processor, path)
        model = load_model(path, vision_mask, dtype, check_memory, adapter_path)
        return model, processor.result()


def load_processor(path: Path, **processor_kwargs):
    """The checkpoint's processor: tokenizer (tokenizer.json), chat template, image, video and audio.

    Generation stops at <eos>, <turn|> and <|tool_response>, plus any id generation_config.json adds.
    """
    from mlx_gemma4u.processing import Gemma4UProcessor

    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise CheckpointError(f"{path} has no tokenizer files (tokenizer.json, tokenizer_config.json).")
    processor = Gemma4UProcessor.from_pretrained(path, eos_token_ids=_stop_ids(path), **processor_kwargs)
    processor.sampling_defaults = sampling_defaults(path)
    return processor


SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_defaults(path: Path) -> dict:
    """How the checkpoint means to be sampled: the sampling keys its generation_config.json sets
    (SamplingParams' names; do_sample false is greedy) -> {} when it sets none."""
    gen = path / "generation_config.json"
    config = json.loads(gen.read_text()) if gen.is_file() else {}
    if config.get("do_sample") is False:
        return {"temperature": 0.0}
    return {key: config[key] for key in SAMPLING_KEYS if config.get(key) is not None}


def _stop_ids(path: Path) -> list[int]:
    from mlx_gemma4u.processing.text import GEMMA4_STOP_IDS

    ids = set(GEMMA4_STOP_IDS)
    gen = path / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    return sorted(ids)


def load_model(
    path: Path,
    vision_mask: str = "gemma4",
    dtype: str | None = None,
    check_memory: bool = True,
    adapter_path: str | os.PathLike | None = None,
) -> Model:
    """config.json + *.safetensors in `path` (any layout checkpoints.py knows) -> a Model with every
    weight checked against the config (and the adapters of `adapter_path` added)."""
    path = Path(path)
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    config = ModelConfig.from_file(path / "config.json")
    weights = read_weights(path, dtype, check_memory)
    layout = checkpoints.detect(weights)
    config = checkpoints.without_absent_media(config, weights, layout)
    model = Model(config, vision_mask=vision_mask)
    install_weights(model, weights, layout, config.quantization, dtype)
    if adapter_path is not None:
        load_adapters(model, adapter_path)
    return model


def install_weights(
    model: nn.Module, weights: dict, layout: checkpoints.Layout, quantization: dict | None, dtype: str | None
) -> None:
    """Load a checkpoint's tensors (named as in `layout`) into `model`, a Model or a DraftModel
    (`set_weights`), and evaluate them. Last, on a CPU, the model's large work is cut across the
    cores (backends/cpu_cores.py)."""
    set_weights(model, weights, layout, quantization, dtype)
    mx.eval(model.parameters())
    cpu_cores.apply(model)


def set_weights(
    model: nn.Module, weights: dict, layout: checkpoints.Layout, quantization: dict | None, dtype: str | None
) -> None:
    """Set a checkpoint's tensors (named as in `layout`) as `model`'s, unevaluated. The layers stored
    quantized become quantized layers first (config.json's `quantization`), so that their names are
    there to check; the sanitized weights must then be exactly the model's, and the floating ones
    (not the quantization scales and biases) are cast to `dtype`."""
    if quantization:
        quantize_like(model, quantization, weights, layout)
    weights = model.sanitize(weights)
    check_complete(model, weights)
    if dtype is not None:
        weights = {
            k: v.astype(DTYPES[dtype])
            if mx.issubdtype(v.dtype, mx.floating) and not k.endswith(".scales") and not k.endswith(".biases")
            else v
            for k, v in weights.items()
        }
    model.load_weights(list(weights.items()), strict=True)
    model.eval()


def quantize_like(model: nn.Module, quantization: dict, weights: dict, layout: checkpoints.Layout) -> None:
    """Turn exactly the layers the checkpoint stores quantized (those with `.scales`) into quantized
    layers, with config.json's per-module settings where it has them."""
    body = {
        "group_size": quantization.get("group_size", 64),
        "bits": quantization.get("bits", 4),
        "mode": quantization.get("mode", "affine"),
    }
    entries = checkpoints.quantization_in_our_names(quantization, layout)
    quantized = {layout.ours(k.removesuffix(".scales")) for k in weights if k.endswith(".scales")}

    def stored_quantized(name: str, module: nn.Module) -> bool | dict:
        if name not in quantized:
            return False
        entry = entries.get(name)
        return {**body, **{k: entry[k] for k in body if k in entry}} if isinstance(entry, dict) else True

    nn.quantize(model, **body, class_predicate=stored_quantized)


def check_complete(model: nn.Module, weights: dict) -> None:
    expected = dict(tree_flatten(model.parameters()))
    for name, param in expected.items():
        if name not in weights:
            raise CheckpointError(f"The checkpoint lacks the weight {name!r} that config.json calls for.")
        if tuple(weights[name].shape) != tuple(param.shape):
            raise CheckpointError(
                f"The weight {name!r} has shape {tuple(weights[name].shape)} but config.json "
                f"calls for {tuple(param.shape)}."
            )


def weight_files(path: Path) -> list[Path]:
    """The folder's safetensors files: those its index names, else every *.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e}).") from None
        files = [path / n for n in names]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors weight files (pickled .bin files are never loaded).")
    return files


def read_weights(
    path: Path, dtype: str | None = None, check_memory: bool = True, files: list[Path] | None = None
) -> dict[str, mx.array]:
    """Every tensor of the folder's safetensors files (sharded, with or without an index), or of
    just `files`.

    All headers are checked, and the memory the weights will take is compared with the machine's,
    before anything is loaded.
    """
    files = weight_files(path) if files is None else files
    sizes: dict[str, int] = {}
    for f in files:
        for kind, nbytes in check_safetensors(f).items():
            sizes[kind] = sizes.get(kind, 0) + nbytes
    if check_memory:
        _check_memory(sizes, dtype)
    weights = {}
    for f in files:
        weights.update(mx.load(str(f)))  # lazy: a tensor is read when it is first evaluated
    return weights


def _check_memory(sizes: dict[str, int], dtype: str | None) -> None:
    """Refuse weights that cannot fit: over 90% of the machine's memory once cast to `dtype`."""
    scale = DTYPES[dtype].size if dtype in DTYPES else None
    need = sum(n * scale // SAFETENSORS_DTYPES[k] if scale and k in FLOAT_DTYPES else n for k, n in sizes.items())
    have = machine_memory()
    if need > 0.9 * have:
        raise MemoryLimitError(
            f"The weights need {need / 1e9:.1f} GB but this machine has {have / 1e9:.1f} GB of memory; use a "
            "quantized model (mlx-gemma4u convert -q), or pass check_memory=False (--no-memory-check) to try anyway."
        )


def machine_memory() -> int:
    """Bytes of memory the model can live in: the GPU's on Apple silicon, else the RAM."""
    if mx.metal.is_available():
        return int(mx.metal.device_info()["memory_size"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def load_draft_model(
    path_or_repo: str | os.PathLike, dtype: str | None = None, check_memory: bool = True
) -> DraftModel:
    """A Gemma 4 assistant (e.g. google/gemma-4-12B-it-assistant, or a folder `mlx-gemma4u convert`
    made of one, quantized or not): local folder, hub id or "demo" (the demo checkpoint's random
    drafter) -> DraftModel, every weight checked against config.json (the same checks and errors as `load`)."""
    path = _drafter_folder(path_or_repo)
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    config = DraftConfig.from_file(path / "config.json")
    weights = read_weights(path, dtype, check_memory)
    model = DraftModel(config)
    install_weights(model, weights, checkpoints.ASSISTANT, config.quantization, dtype)
    return model


def _drafter_folder(path_or_repo: str | os.PathLike) -> Path:
    """ "demo" (when no folder of that name exists) -> the demo drafter's folder, written first if
    needed (demo.ensure_demo_drafter); anything else as loading.resolve finds or fetches it."""
    if str(path_or_repo) == "demo" and not Path("demo").is_dir():
        from mlx_gemma4u.weights.demo import ensure_demo_drafter

        return ensure_demo_drafter()
    return resolve(path_or_repo)
