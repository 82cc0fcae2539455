"""Hugging Face checkpoint -> MLX folder: cast, quantize or dequantize, shard, write atomically, upload.

    source safetensors --mx.load (lazy)--> Model.sanitize names --cast / quantize (lazy)-->
    shards of <= 5 GiB --one tensor at a time: compute, write, drop--> staging folder --rename--> DST

Nothing is computed until a tensor is written, and each is dropped once written, so the peak
memory is about the largest tensor (the token embedding), never the whole model. Outputs carry
our module names, so `load_model` reads them directly; config.json's "quantization" says how to
rebuild the quantized layers. Everything is written into a staging folder beside DST, renamed
into place at the end (files.replacing_folder): a killed run leaves no DST or the previous one.

An MTP assistant (config.json's model_type "gemma4_unified_assistant", draft.py) converts the same
way with the same flags and recipes, under its own names (which `load_draft_model` reads): its
decoder layers and tied embedding are quantized, its projections to and from the target and its
centroid scorer stay in float (quantize._ASSISTANT_FLOAT), and `token_ordering` stays integer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from mlx_gemma4u.convert import quantize as q
from mlx_gemma4u.convert.upload import upload, upload_token, write_model_card
from mlx_gemma4u.errors import InputError
from mlx_gemma4u.files import replacing_folder
from mlx_gemma4u.models import layouts as checkpoints
from mlx_gemma4u.models import lora
from mlx_gemma4u.models.config import ModelConfig
from mlx_gemma4u.models.drafter import MODEL_TYPE as ASSISTANT_TYPE
from mlx_gemma4u.models.drafter import DraftConfig, DraftModel
from mlx_gemma4u.models.model import Model
from mlx_gemma4u.weights.headers import check_safetensors
from mlx_gemma4u.weights.loading import DTYPES, check_complete, load_model, quantize_like, resolve, weight_files

EXTRA_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
)
_ST_DTYPES = {
    mx.float32: "F32",
    mx.float16: "F16",
    mx.bfloat16: "BF16",
    mx.uint32: "U32",
    mx.uint8: "U8",
    mx.int32: "I32",
    mx.int64: "I64",
    mx.uint16: "U16",
    mx.int8: "I8",
    mx.bool_: "BOOL",
}
_OWNER = ".convert-owner"
LOADS_IN = (
    "The weights are in the mlx-community layout (as mlx-vlm writes them): this folder loads in mlx-gemma4u, "
    "in mlx-vlm (tested with 0.7.10) and in the apps built on mlx-vlm."
)
ASSISTANT_LOADS_IN = (
    "This is a drafter for speculative decoding, not a model to run alone: it loads in mlx-gemma4u "
    "(`load_draft_model`, `--draft-model`) beside its target model."
)
# transformers 5.23's Gemma4UnifiedProcessor settings, as its save_pretrained writes them.
PROCESSOR_CONFIG = {
    "processor_class": "Gemma4UnifiedProcessor",
    "image_processor": {
        "image_processor_type": "Gemma4UnifiedImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": False,
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
        "resample": 3,
        "size": {"height": 224, "width": 224},
        "patch_size": 16,
        "pooling_kernel_size": 3,
        "model_patch_size": 48,
        "max_soft_tokens": 280,
    },
    "video_processor": {
        "video_processor_type": "Gemma4UnifiedVideoProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": False,
        "image_mean": [0.0] * 3,
        "image_std": [1.0] * 3,
        "patch_size": 16,
        "pooling_kernel_size": 3,
        "model_patch_size": 48,
        "max_soft_tokens": 70,
        "num_frames": 32,
        "default_fps": 2.0,
    },
    "feature_extractor": {"feature_extractor_type": "Gemma4UnifiedAudioFeatureExtractor", "sampling_rate": 16000},
    "audio_ms_per_token": 40,
}


@dataclass
class Options:
    """What to do to the weights (the command-line flags)."""

    dtype: str | None = None
    quantize: bool = False
    q_bits: int | None = None
    q_group_size: int | None = None
    q_mode: str = "affine"
    quant_recipe: str | None = None  # None: "qat" for a QAT source, else "default"
    dequantize: bool = False


@dataclass
class Summary:
    path: Path
    bytes_on_disk: int
    parameters: int
    bits_per_weight: float
    url: str | None = None

    def __str__(self) -> str:
        return (
            f"{self.path}: {self.bytes_on_disk / 1e9:.2f} GB on disk, {self.parameters / 1e6:.1f}M parameters, "
            f"{self.bits_per_weight:.2f} bits per weight"
        )


def convert(
    hf_path: str | os.PathLike,
    mlx_path: str | os.PathLike,
    options: Options | None = None,
    upload_repo: str | None = None,
    force: bool = False,
    quiet: bool = False,
    shard_gb: int = 5,
    adapter_path: str | os.PathLike | None = None,
) -> Summary:
    """Convert `hf_path` (folder or repo id: a model in any layout checkpoints.py knows, or its MTP
    assistant) into the MLX folder `mlx_path`, written in the mlx-community layout (an assistant in
    its own) -> what was written. adapter_path: fold these adapters (`mlx-gemma4u lora`) into the
    weights first (`mlx-gemma4u fuse`)."""
    options = options or Options()
    _check_options(options, _recipe(options, qat=False))
    dst = Path(mlx_path).expanduser()
    _check_destination(dst, force)
    token = upload_token(upload_repo) if upload_repo else None
    src = resolve(hf_path)
    raw = json.loads((src / "config.json").read_text())
    assistant = raw.get("model_type") == ASSISTANT_TYPE
    if assistant and adapter_path is not None:
        raise InputError("Adapters are trained for a model, not for its assistant (drafter).")
    recipe = _recipe(options, is_qat(hf_path, src))
    body = _check_options(options, recipe)
    dtype = _output_dtype(options.dtype, raw)
    layout = checkpoints.ASSISTANT if assistant else checkpoints.COMMUNITY
    with _progress(quiet) as bars, _no_buffer_cache():
        model, weights, stored = _read_source(src, bars, assistant, adapter_path, options.dequantize)
        outputs, quantization = _convert(model, weights, stored, options, recipe, body, dtype)
        del weights
        outputs = checkpoints.in_layout(outputs, layout)
        quantization = quantization and checkpoints.quantization_in(quantization, layout)
        quantize_like(model, quantization or {}, outputs, layout)
        check_complete(model, model.sanitize(outputs))  # exactly what load_model / load_draft_model will check
        parameters, total = parameter_count(model), sum(v.nbytes for v in outputs.values())
        _clean_stale_staging(dst)
        with replacing_folder(dst) as staging:
            (staging / _OWNER).write_text(str(os.getpid()))
            staging.chmod(0o777 & ~_umask())  # mkdtemp made it private; a model folder is not
            _write_weights(staging, outputs, shard_gb, parameters, quantization, bars)
            _write_config(staging, raw, quantization, dtype)
            _copy_extras(src, staging, processor=not assistant)
            summary = Summary(dst, 0, parameters, 8 * total / parameters)
            _card(staging, dst.name, src, hf_path, options, recipe, quantization, summary, assistant)
            (staging / _OWNER).unlink()
    summary.bytes_on_disk = sum(f.stat().st_size for f in dst.iterdir() if f.is_file())
    if upload_repo:
        summary.url = upload(dst, upload_repo, token)
    return summary


def is_qat(hf_path: str | os.PathLike, src: Path) -> bool:
    """Whether the source says it was trained for quantization: "qat" in its repo or folder name
    (google/gemma-4-12B-it-qat-q4_0-unquantized) or among its model card's tags."""
    names = f"{hf_path} {src.name}".lower()
    if re.search(r"(?<![a-z0-9])qat(?![a-z0-9])", names):
        return True
    card = src / "README.md"
    if not card.is_file():
        return False
    from huggingface_hub import ModelCard

    tags = ModelCard.load(card).data.tags or []
    return any(str(t).lower() == "qat" for t in tags)


def _recipe(options: Options, qat: bool) -> str:
    """--quant-recipe, else "qat" for a QAT source (unless the flags ask for other settings), else "default"."""
    if options.quant_recipe:
        return options.quant_recipe
    fits = options.q_bits in (None, 4) and options.q_group_size in (None, 32) and options.q_mode == "affine"
    return "qat" if qat and fits else "default"


def parameter_count(model: nn.Module) -> int:
    """Weights the model has, a quantized layer's counted as the floats they stand for (mlx-lm's
    get_total_parameters skips arrays held by non-leaf modules, like the position table)."""
    bits = {path: module.bits for path, module in model.named_modules() if hasattr(module, "bits")}
    count = 0
    for name, value in tree_flatten(model.parameters()):
        module, leaf = name.rsplit(".", 1)
        if module not in bits:
            count += value.size
        elif leaf == "weight":
            count += value.size * 32 // bits[module]
    return count


def _check_destination(dst: Path, force: bool) -> None:
    """Refuse a DST that is not a folder (with or without --force, which replaces model folders only),
    and an existing folder unless --force; --force still leaves a folder that is not a model's."""
    if not dst.exists():
        return
    if not dst.is_dir():
        raise InputError(f"{dst} is a file, not a folder; choose another --mlx-path for the converted model.")
    if not force:
        raise InputError(f"{dst} already exists; pass --force to replace it, or choose another --mlx-path.")
    if any(dst.iterdir()) and not (dst / "config.json").is_file():
        raise InputError(f"{dst} is not a model folder (no config.json), so --force will not replace it.")


def _output_dtype(requested: str | None, raw: dict) -> str | None:
    """--dtype, else the dtype the source config declares, else None (floats stay as stored)."""
    declared = raw.get("dtype") or raw.get("torch_dtype") or (raw.get("text_config") or {}).get("dtype")
    return requested or (declared if declared in DTYPES else None)


def _read_source(
    src: Path,
    bars: Progress,
    assistant: bool,
    adapter_path: str | os.PathLike | None = None,
    dequantize: bool = False,
) -> tuple[nn.Module, dict[str, mx.array], dict | None]:
    """The source, as load_model (an assistant: load_draft_model) reads it -> (a float model of its
    config, its tensors lazily under our names, its "quantization" entry keyed by our module paths or None).

    With `adapter_path`, the tensors are those of the source with the adapters folded in (mlx-lm's
    fuse: a quantized layer is quantized again as it was stored, unless `dequantize`), read whole."""
    weights = _read(src, bars)
    if assistant:
        config, build, layout = DraftConfig.from_file(src / "config.json"), DraftModel, checkpoints.ASSISTANT
    else:
        layout = checkpoints.detect(weights)
        config = checkpoints.without_absent_media(ModelConfig.from_file(src / "config.json"), weights, layout)
        build = Model
    source, stored = build(config), None
    if config.quantization:
        quantize_like(source, config.quantization, weights, layout)
        stored = checkpoints.quantization_in_our_names(config.quantization, layout)
    if adapter_path is not None:
        fused = lora.fuse(load_model(src, adapter_path=adapter_path), dequantize)
        tensors = dict(tree_flatten(fused.parameters()))
    else:
        tensors = source.sanitize(weights)
    return (build(config) if stored else source), tensors, stored


def _read(src: Path, bars: Progress) -> dict[str, mx.array]:
    """Every source tensor, checked and loaded lazily (no data is read until it is needed)."""
    files = weight_files(src)
    task = bars.add_task("reading", total=sum(f.stat().st_size for f in files if f.is_file()))
    weights = {}
    for f in files:
        check_safetensors(f)
        weights.update(mx.load(str(f)))
        bars.advance(task, f.stat().st_size)
    return weights


def _check_options(options: Options, recipe: str) -> q.Spec | None:
    """Refuse flags that contradict each other before anything is downloaded -> the body's Spec when quantizing."""
    if options.dtype is not None and options.dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {options.dtype!r}.")
    if options.quantize and options.dequantize:
        raise InputError("Choose either --quantize or --dequantize, not both.")
    if not options.quantize:
        return None
    body = q.body_spec(options.q_bits, options.q_group_size, options.q_mode, recipe)
    q.check_recipe(recipe, body)
    return body


def _convert(
    model: nn.Module,
    weights: dict,
    stored: dict | None,
    options: Options,
    recipe: str,
    body: q.Spec | None,
    dtype: str | None,
) -> tuple[dict[str, mx.array], dict | None]:
    """Sanitized source tensors -> (lazy output tensors, config.json's "quantization" or None).

    `model` is a float model of the config (the recipe plans on it); `stored` the source's
    quantization entry in our names, `body` the checked Spec of the bulk of the model when
    quantizing. A quantized source is dequantized first when asked to dequantize or requantize.
    Source tensors are popped as they are used, so only the lazy graphs refer to them.
    """
    if options.dequantize and not stored:
        raise InputError("--dequantize needs a quantized source; this one is not quantized.")
    cast = (lambda a: a.astype(DTYPES[dtype])) if dtype else (lambda a: a)
    outputs, quantization = {}, stored
    if stored and (options.dequantize or body is not None):
        for path, spec in q.stored_specs(stored, weights).items():
            weights[f"{path}.weight"] = q.dequantize_weight(path, weights, spec)
        quantization = None
    elif stored:  # quantized layers stay as stored; the rest is cast
        specs = q.stored_specs(stored, weights)
        outputs.update({n: weights.pop(n) for n in list(weights) if n.rsplit(".", 1)[0] in specs})
    if body is not None:
        layers = q.plan(model, recipe, body)
        for path, spec in layers.items():
            outputs.update(q.quantize_weight(path, cast(weights.pop(f"{path}.weight")), spec))
        quantization = q.config_entry(body, layers)
    for name in list(weights):
        value = weights.pop(name)
        outputs[name] = cast(value) if mx.issubdtype(value.dtype, mx.floating) else value
    return outputs, quantization


def _write_weights(
    out: Path, outputs: dict, shard_gb: int, parameters: int, quantization: dict | None, bars: Progress
) -> None:
    """Shards of at most `shard_gb` GiB (mlx-lm's make_shards) plus model.safetensors.index.json."""
    from mlx_lm.utils import make_shards  # here: mlx_lm.utils imports transformers

    quantized = {n.rsplit(".", 1)[0] for n in outputs if n.endswith(".scales")} if quantization else set()
    shards = make_shards(outputs, shard_gb)
    outputs.clear()
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    if len(shards) == 1:
        names = ["model.safetensors"]
    index = {
        "metadata": {"total_size": sum(v.nbytes for s in shards for v in s.values()), "total_parameters": parameters},
        "weight_map": {k: name for shard, name in zip(shards, names) for k in sorted(shard)},
    }
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    sizes = {"quantizing": 0, "converting": 0}
    for shard in shards:
        for k, v in shard.items():
            sizes["quantizing" if k.rsplit(".", 1)[0] in quantized else "converting"] += v.nbytes
    tasks = {what: bars.add_task(what, total=n) for what, n in sizes.items() if n}
    writing = bars.add_task("writing", total=index["metadata"]["total_size"])

    def done(name: str, a: mx.array) -> None:
        bars.advance(tasks["quantizing" if name.rsplit(".", 1)[0] in quantized else "converting"], a.nbytes)
        bars.advance(writing, a.nbytes)

    for shard, name in zip(shards, names):
        write_safetensors(out / name, shard, done)
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_safetensors(path: Path, tensors: dict[str, mx.array], done=lambda name, a: None) -> None:
    """Write `tensors` as one safetensors file, computing each just before it is written and
    dropping it after (the dict is emptied), so at most one tensor's data is held at a time."""
    header, offset = {}, 0
    for name, a in tensors.items():
        header[name] = {
            "dtype": _ST_DTYPES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
    header["__metadata__"] = {"format": "mlx"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in list(tensors):
            a = mx.contiguous(tensors.pop(name))
            mx.eval(a)
            f.write(memoryview(a).cast("B"))
            done(name, a)
            del a


def _write_config(out: Path, raw: dict, quantization: dict | None, dtype: str | None) -> None:
    config = {k: v for k, v in raw.items() if k not in ("quantization", "quantization_config")}
    if quantization:
        config["quantization"] = quantization
    if dtype:
        config["dtype"] = dtype
        if isinstance(config.get("text_config"), dict):
            config["text_config"] = {**config["text_config"], "dtype": dtype}
    (out / "config.json").write_text(json.dumps(config, indent=2))


def _copy_extras(src: Path, out: Path, processor: bool) -> None:
    """Tokenizer, chat template and processor files, as the source has them; if `processor` (not for
    an assistant, which has no processor), a processor_config.json with transformers' defaults when
    the source has none (mlx-vlm builds its processor from it)."""
    for name in EXTRA_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    if processor and not (out / "processor_config.json").is_file():
        (out / "processor_config.json").write_text(json.dumps(PROCESSOR_CONFIG, indent=2))


def _card(
    out: Path,
    dst_name: str,
    src: Path,
    hf_path,
    options: Options,
    recipe: str,
    quantization: dict | None,
    summary: Summary,
    assistant: bool,
) -> None:
    """The output's model card: its source, the command that made it, its size, where it loads; a
    conversion of the demo checkpoint says first that its weights are random."""
    demo = json.loads((src / "config.json").read_text()).get("mlx_gemma4u_demo")
    base = str(hf_path) if not Path(hf_path).expanduser().exists() else None
    license_ = None
    if (src / "README.md").is_file():
        from huggingface_hub import ModelCard

        data = ModelCard.load(src / "README.md").data
        license_, base = data.license, base or data.base_model
    flags = [f"--dtype {options.dtype}"] if options.dtype else []
    if options.quantize:
        flags += ["-q", f"--quant-recipe {recipe}", f"--q-mode {options.q_mode}"]
        flags += [f"--q-bits {options.q_bits}"] * bool(options.q_bits)
        flags += [f"--q-group-size {options.q_group_size}"] * bool(options.q_group_size)
    flags += ["--dequantize"] * options.dequantize
    source = "--demo" if demo else f"--hf-path {base or 'SRC'}"
    made = " ".join(["mlx-gemma4u convert", source, "--mlx-path", dst_name, *flags])
    stats = f"**{demo}**\n\n" if demo else ""
    stats += f"{summary.parameters / 1e9:.2f}B parameters, {summary.bits_per_weight:.2f} bits per weight."
    if quantization:
        overall = {k: v for k, v in quantization.items() if not isinstance(v, dict)}
        stats += f" Quantization (config.json): {json.dumps(overall)}."
    stats += f"\n\n{ASSISTANT_LOADS_IN if assistant else LOADS_IN}"
    write_model_card(out, base, license_, made, stats, assistant)


def _clean_stale_staging(dst: Path) -> None:
    """Remove staging folders of this DST left by killed runs (their owner process is gone)."""
    for folder in dst.parent.glob(f".{dst.name}.*.partial"):
        owner = folder / _OWNER
        pid = int(owner.read_text() or 0) if owner.is_file() else 0
        if pid == 0 or not _alive(pid):
            shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def _no_buffer_cache():
    """Free each written tensor's memory at once: MLX otherwise keeps freed buffers for reuse, and
    the process would grow towards the size of the whole model."""
    previous = mx.set_cache_limit(0)
    try:
        yield
    finally:
        mx.set_cache_limit(previous)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _progress(quiet: bool) -> Progress:
    """rich progress bars on stderr, one per phase (none when quiet)."""
    return Progress(
        TextColumn("{task.description:>10}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=quiet,
    )
