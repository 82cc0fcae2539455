"""Every bad input a user can give, through the public API and the CLI: our error type, a message
that names the problem, and nothing on disk changed.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile
from conftest import FIXTURES
from safetensors.numpy import load_file, save_file

import mlx_gemma4u
from mlx_gemma4u.errors import CheckpointError, ConfigError, Gemma4UError, InputError

# ---------------------------------------------------------------- broken checkpoints (load)


def edit_config(change):
    def apply(folder: Path):
        raw = json.loads((folder / "config.json").read_text())
        change(raw)
        (folder / "config.json").write_text(json.dumps(raw))

    return apply


def edit_text_config(**values):
    return edit_config(lambda raw: raw["text_config"].update(values))


def edit_tensors(change):
    def apply(folder: Path):
        tensors = load_file(folder / "model.safetensors")
        change(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    return apply


def edit_header(change):
    def apply(folder: Path):
        path = folder / "model.safetensors"
        data = path.read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        change(header, [k for k in header if k != "__metadata__"])
        blob = json.dumps(header).encode()
        path.write_bytes(len(blob).to_bytes(8, "little") + blob + data[8 + n :])

    return apply


def cut_file(keep):
    def apply(folder: Path):
        path = folder / "model.safetensors"
        path.write_bytes(path.read_bytes()[:keep])

    return apply


def write(name, data):
    return lambda folder: (folder / name).write_bytes(data)


def remove(name):
    return lambda folder: (folder / name).unlink()


BROKEN_CHECKPOINTS = {
    "no config.json": (remove("config.json"), ConfigError, "needs a config.json"),
    "config.json not JSON": (write("config.json", b"{oops"), ConfigError, "not readable JSON"),
    "config.json a list": (write("config.json", b"[1, 2]"), ConfigError, "JSON object"),
    "unknown model_type": (edit_config(lambda r: r.update(model_type="llama")), ConfigError, "model_type 'llama'"),
    "negative hidden size": (edit_text_config(hidden_size=-64), ConfigError, "hidden_size"),
    "heads not a multiple": (edit_text_config(num_attention_heads=3), ConfigError, "multiple"),
    "layer_types too short": (edit_text_config(layer_types=["full_attention"]), ConfigError, "layer_types"),
    "unknown layer type": (edit_text_config(layer_types=["local"] * 6), ConfigError, "unknown layer type"),
    "unsupported rope": (
        edit_text_config(
            rope_parameters={
                "sliding_attention": {"rope_type": "yarn", "rope_theta": 1e4},
                "full_attention": {"rope_theta": 1e6},
            }
        ),
        ConfigError,
        "rope_type 'yarn'",
    ),
    "text_config a string": (edit_config(lambda r: r.update(text_config="big")), ConfigError, "text_config"),
    "vision dims disagree": (
        edit_config(lambda r: r["vision_config"].update(output_proj_dims=7)),
        ConfigError,
        "output_proj_dims",
    ),
    "token id outside vocab": (edit_config(lambda r: r.update(image_token_id=10**6)), ConfigError, "image_token_id"),
    "weights wider than config": (edit_text_config(intermediate_size=96), CheckpointError, "has shape"),
    "missing weight": (
        edit_tensors(lambda t: t.pop("model.language_model.norm.weight")),
        CheckpointError,
        "lacks the weight 'language_model.norm.weight'",
    ),
    "unknown weight": (
        edit_tensors(lambda t: t.update({"model.extra.weight": np.zeros(2, np.float32)})),
        CheckpointError,
        "model.extra.weight",
    ),
    "file of 4 bytes": (cut_file(4), CheckpointError, "too short"),
    "file cut in the header": (cut_file(100), CheckpointError, "truncated"),
    "file cut in the data": (cut_file(-100), CheckpointError, "past the end"),
    "header not JSON": (
        lambda f: (f / "model.safetensors").write_bytes((8).to_bytes(8, "little") + b"{notjson" + b"\0" * 64),
        CheckpointError,
        "unreadable safetensors header",
    ),
    "unsupported dtype": (
        edit_header(lambda h, names: h[names[0]].update(dtype="C64")),
        CheckpointError,
        "unsupported dtype 'C64'",
    ),
    "overlapping tensors": (
        edit_header(
            lambda h, names: h[names[1]].update(
                data_offsets=[h[names[0]]["data_offsets"][0], h[names[1]]["data_offsets"][1]]
            )
        ),
        CheckpointError,
        "overlap",
    ),
    "absurd shape": (edit_header(lambda h, names: h[names[0]].update(shape=[10**12])), CheckpointError, "claims shape"),
    "malformed entry": (edit_header(lambda h, names: h.update({names[0]: "x"})), CheckpointError, "malformed"),
    "only pickles": (
        lambda f: (f / "model.safetensors").rename(f / "pytorch_model.bin"),
        CheckpointError,
        "pickled .bin files are never loaded",
    ),
    "index not JSON": (
        write("model.safetensors.index.json", b"nope"),
        CheckpointError,
        "not a valid safetensors index",
    ),
    "index names a missing shard": (
        write("model.safetensors.index.json", b'{"weight_map": {"a": "gone.safetensors"}}'),
        CheckpointError,
        "gone.safetensors is missing",
    ),
}


def snapshot(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("case", list(BROKEN_CHECKPOINTS))
def test_broken_checkpoint(case, hf_checkpoints, tmp_path):
    breakage, error, needle = BROKEN_CHECKPOINTS[case]
    folder = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoints["full"][1], folder)
    breakage(folder)
    before = snapshot(folder)
    with pytest.raises(error) as caught:
        mlx_gemma4u.load(folder)
    assert needle in str(caught.value)
    assert "\n" not in str(caught.value)
    assert snapshot(folder) == before


def test_broken_tokenizer_files(demo_home, tmp_path):
    folder = tmp_path / "demo"
    shutil.copytree(demo_home / "demo-v1", folder)
    (folder / "tokenizer.json").write_text("{broken")
    before = snapshot(folder)
    with pytest.raises(ConfigError, match="tokenizer"):
        mlx_gemma4u.load(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        mlx_gemma4u.load(folder)
    assert set(snapshot(folder).items()) <= set(before.items())


# ---------------------------------------------------------------- bad prompts, media, arguments (generate)


@pytest.fixture(scope="module")
def demo(demo_home):
    return mlx_gemma4u.load(demo_home / "demo-v1")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, fixtures_dir):
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.jpg").write_text("this is text, not a picture")
    (d / "half.jpg").write_bytes((fixtures_dir / "images/landscape_rocket_640x427.jpg").read_bytes()[:3000])
    soundfile.write(d / "empty.wav", np.zeros(0, np.float32), 16000)
    soundfile.write(d / "nan.wav", np.full(1600, np.nan, np.float32), 16000, subtype="FLOAT")
    (d / "clip.mp4").write_text("not a video")
    (d / "photos").mkdir()
    shutil.copy(fixtures_dir / "images/landscape_rocket_640x427.jpg", d / "photo.jpg")
    return d


def user(*items):
    return [{"role": "user", "content": list(items)}]


def image_item(path):
    return {"type": "image", "path": str(path)}


BAD_GENERATIONS = {
    "unknown role": (lambda f: ([{"role": "robot", "content": "hi"}], {}), "role 'robot'"),
    "content a number": (lambda f: ([{"role": "user", "content": 5}], {}), "content must be a string or a list"),
    "item a string": (lambda f: (user("hi"), {}), "item 0 must be a dict"),
    "unknown item type": (lambda f: (user({"type": "blob"}), {}), "type 'blob'"),
    "text item without text": (lambda f: (user({"type": "text"}), {}), "without a 'text' string"),
    "image item without source": (lambda f: (user({"type": "image"}), {}), "without a source"),
    "message not a dict": (lambda f: ([{"role": "user", "content": "a"}, ["b"]], {}), "prompt must be"),
    "prompt a number": (lambda f: (3.5, {}), "prompt must be"),
    "empty prompt": (lambda f: ("", {}), "empty"),
    "missing image": (lambda f: (user(image_item(f / "missing.png")), {}), "missing.png"),
    "text file named .jpg": (lambda f: (user(image_item(f / "notes.jpg")), {}), "notes.jpg"),
    "truncated image": (lambda f: (user(image_item(f / "half.jpg")), {}), "half.jpg"),
    "zero-length audio": (lambda f: (user({"type": "audio", "path": str(f / "empty.wav")}), {}), "empty.wav"),
    "all-NaN audio": (lambda f: (user({"type": "audio", "path": str(f / "nan.wav")}), {}), "nan.wav"),
    "not a video": (lambda f: (user({"type": "video", "path": str(f / "clip.mp4")}), {}), "clip.mp4"),
    "folder as image": (lambda f: (user(image_item(f / "photos")), {}), "is a folder, not a file; pass the image file"),
    "folder as audio": (
        lambda f: (user({"type": "audio", "path": str(f / "photos")}), {}),
        "is a folder, not a file; pass the audio file",
    ),
    "folder as video": (
        lambda f: (user({"type": "video", "path": str(f / "photos")}), {}),
        "is a folder, not a file; pass the video file",
    ),
    "jpg as video": (
        lambda f: (user({"type": "video", "path": str(f / "photo.jpg")}), {}),
        "is a still image, not a video",
    ),
    "unsupported budget": (lambda f: ("<|image|>", {"images": [str(f / "notes.jpg")], "max_soft_tokens": 99}), "99"),
    "float image without pixels": (
        lambda f: ("<|image|>", {"images": [np.zeros((0, 5, 3), np.float32)]}),
        "no content",
    ),
    "unreachable URL": (lambda f: (user({"type": "image", "url": "http://127.0.0.1:9/cat.png"}), {}), "127.0.0.1:9"),
    "placeholder without media": (lambda f: ("Look: <|image|>", {}), "placeholder"),
    "zero max_tokens": (lambda f: ("Hi", {"max_tokens": 0}), "max_tokens"),
    "negative temperature": (lambda f: ("Hi", {"temperature": -0.5}), "temperature"),
    "top_p above one": (lambda f: ("Hi", {"top_p": 1.5}), "top_p"),
    "negative top_k": (lambda f: ("Hi", {"top_k": -1}), "top_k"),
    "min_p of one": (lambda f: ("Hi", {"min_p": 1.0}), "min_p"),
    "kv_bits of 3": (lambda f: ("Hi", {"kv_bits": 3}), "kv_bits"),
    "longer than the context": (lambda f: ("Hi", {"max_tokens": 300_000}), "context"),
    "media with token ids": (lambda f: ([2, 3], {"images": [str(f / "notes.jpg")]}), "token ids cannot take media"),
}


@pytest.mark.parametrize("case", list(BAD_GENERATIONS))
def test_bad_generation_input(case, demo, bad_files):
    model, processor = demo
    make, needle = BAD_GENERATIONS[case]
    prompt, kwargs = make(bad_files)
    before = snapshot(bad_files)
    with pytest.raises(InputError) as caught:
        list(mlx_gemma4u.stream_generate(model, processor, prompt, **kwargs))
    assert needle in str(caught.value)
    assert snapshot(bad_files) == before


def test_bad_load_options(hf_checkpoints):
    with pytest.raises(InputError, match="vision_mask"):
        mlx_gemma4u.load(hf_checkpoints["full"][1], vision_mask="bidirectional")
    with pytest.raises(CheckpointError, match="dtype"):
        mlx_gemma4u.load(hf_checkpoints["full"][1], dtype="int8")


# ---------------------------------------------------------------- prompt cache files (PromptCache.load)


@pytest.fixture(scope="module")
def cache_models(demo, demo_home, tmp_path_factory):
    """The demo and the variants of it a cache saved from the demo must not load into."""
    from mlx_gemma4u.convert.converter import Options, convert
    from mlx_gemma4u.models.config import ModelConfig
    from mlx_gemma4u.models.model import Model
    from mlx_gemma4u.weights.demo import CONFIG
    from mlx_gemma4u.weights.loading import load_model

    folder = demo_home / "demo-v1"
    q4 = convert(folder, tmp_path_factory.mktemp("q4") / "demo-4bit", Options(quantize=True), quiet=True).path
    wider = Model(ModelConfig.from_dict({**CONFIG, "text_config": {**CONFIG["text_config"], "sliding_window": 64}}))
    wider.set_dtype(mx.bfloat16)
    return {
        "demo": demo[0],
        "4-bit demo": load_model(q4),
        "float32 demo": load_model(folder, dtype="float32"),
        "hf-forward demo": load_model(folder, vision_mask="hf-forward"),
        "other config": wider,
    }


@pytest.fixture(scope="module")
def cache_files(demo, demo_home, tmp_path_factory):
    from mlx_lm.models.cache import save_prompt_cache

    model, processor = demo
    d = tmp_path_factory.mktemp("caches")
    cache = mlx_gemma4u.PromptCache(model)
    mlx_gemma4u.generate(model, processor, "Hi", max_tokens=2, prompt_cache=cache)
    cache.save(d / "demo.safetensors")
    save_prompt_cache(str(d / "mlx-lm.safetensors"), cache.caches, {"tokens": "[]"})
    (d / "notes.safetensors").write_text("not a cache")
    shutil.copy(demo_home / "demo-v1" / "model.safetensors", d / "weights.safetensors")
    (d / "folder").mkdir()
    return d


BAD_PROMPT_CACHES = {
    "missing file": ("missing.safetensors", "demo", "no prompt cache file"),
    "a folder": ("folder", "demo", "is a folder"),
    "text file": ("notes.safetensors", "demo", "not a prompt cache file"),
    "model weights": ("weights.safetensors", "demo", "not written by PromptCache.save"),
    "mlx-lm's cache, no fingerprint": ("mlx-lm.safetensors", "demo", "not written by PromptCache.save"),
    "float cache into the 4-bit demo": ("demo.safetensors", "4-bit demo", "quantization none, this model has 4-bit"),
    "bfloat16 cache into float32": ("demo.safetensors", "float32 demo", "dtype bfloat16, this model has float32"),
    "other vision mask": ("demo.safetensors", "hf-forward demo", "vision mask gemma4"),
    "same layers, other config": ("demo.safetensors", "other config", "saved with config"),
}


@pytest.mark.parametrize("case", list(BAD_PROMPT_CACHES))
def test_bad_prompt_cache_file(case, cache_models, cache_files):
    name, model, needle = BAD_PROMPT_CACHES[case]
    before = snapshot(cache_files)
    with pytest.raises(InputError) as caught:
        mlx_gemma4u.PromptCache.load(cache_files / name, cache_models[model])
    assert needle in str(caught.value) and "\n" not in str(caught.value)
    assert snapshot(cache_files) == before


def test_prompt_cache_save_to_a_folder(demo, tmp_path):
    with pytest.raises(InputError, match="is a folder"):
        mlx_gemma4u.PromptCache(demo[0]).save(tmp_path)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the CLI: one line, exit code 1


CLI_CASES = {
    "missing folder": (["generate", "--model", "no/such/folder/here", "--prompt", "Hi"], "not a model folder"),
    "missing image": (["generate", "--demo", "--prompt", "Hi", "--image", "nowhere.png"], "nowhere.png"),
    # bad sampling flags never get this far: argparse refuses them (test_demo_cli.py)
    "folder as --image": (
        ["generate", "--demo", "--prompt", "Hi", "--image", str(Path(__file__).parent)],
        "is a folder",
    ),
    "png as --video": (
        ["generate", "--demo", "--prompt", "Hi", "--video", str(FIXTURES / "images/tiny_coffee_40x27.png")],
        "still image",
    ),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_reports_one_line(case, demo_home):
    args, needle = CLI_CASES[case]
    env = {**os.environ, "MLX_GEMMA4U_HOME": str(demo_home)}
    run = subprocess.run(
        [sys.executable, "-m", "mlx_gemma4u", *args], capture_output=True, text=True, env=env, timeout=300
    )
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert run.returncode == 1 and len(errors) == 1 and needle in errors[0]
    assert "Traceback" not in run.stderr


def test_every_error_is_one_family():
    for error in (ConfigError, CheckpointError, InputError):
        assert issubclass(error, Gemma4UError) and issubclass(error, ValueError)
