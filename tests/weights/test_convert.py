"""The converter: float dtypes equal the source, quantized models agree with it, dequantize round-trips,
the output is complete and atomic (kill -9), and --upload-repo talks to a hub (a local stand-in)."""

import base64
import copy
import json
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import mlx.core as mx
import numpy as np
import pytest
import reference
import torch
from killing import kill_mid_write

from mlx_gemma4u import generate
from mlx_gemma4u.cli.main import main
from mlx_gemma4u.convert.converter import Options, convert
from mlx_gemma4u.convert.upload import UploadError
from mlx_gemma4u.errors import InputError
from mlx_gemma4u.weights import demo
from mlx_gemma4u.weights.loading import load, load_model

PROMPTS = np.random.default_rng(0).integers(3, reference.V - 16, size=(4, 24))
CONVERSIONS = {
    "float32": Options(dtype="float32"),
    "float16": Options(dtype="float16"),
    "bfloat16": Options(dtype="bfloat16"),
    "q4": Options(quantize=True),  # default recipe: 4-bit MLP, 6-bit attention and embedding, float media
    "q8": Options(quantize=True, q_bits=8, quant_recipe="uniform"),
    "mxfp4": Options(quantize=True, q_mode="mxfp4", quant_recipe="uniform"),
}


@pytest.fixture(scope="module")
def source(hf_checkpoints, tmp_path_factory):
    """The "full" float32 checkpoint (vocabulary 512, so no real tokenizer: load_model, not load)."""
    out = tmp_path_factory.mktemp("src") / "hf"
    shutil.copytree(hf_checkpoints["full"][1], out)
    return out


@pytest.fixture(scope="module")
def tame(tmp_path_factory):
    """A "full" checkpoint whose random weights keep it well-conditioned, for measuring quantization.

    tests/support/reference.py's weights make a chaotic model (float16 rounding alone moves its logits by
    5%, 8-bit weights flip 16% of its argmaxes), useless for telling recipes apart. Here: linears
    N(0, 1/fan_in), embedding N(0, 1/4), norms near 1 (q/k norms near 0.4, post-norms near 4, so
    attention is not one-hot and layers outweigh the tied embedding), layer scalars 1.
    """
    model = reference.build(reference.TEXT_CONFIGS["full"], seed=1)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 0.0 if name.endswith("bias") else 4.0 if "post_" in name else 0.4 if "_norm." in name else 1.0
            std = 0.05 if p.ndim == 1 else 0.5 if "embed_tokens" in name else p.shape[-1] ** -0.5
            p.copy_((base if p.ndim == 1 else 0.0) + std * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.fill_(1.0)
    return reference.save(model, tmp_path_factory.mktemp("tame") / "hf")


@pytest.fixture(scope="module")
def converted(source, tame, tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    done = {
        name: convert(tame if name.startswith(("q", "mx")) else source, root / name, options, quiet=True)
        for name, options in CONVERSIONS.items()
    }
    done["dequantized"] = convert(root / "q8", root / "dequantized", Options(dequantize=True), quiet=True)
    return done


def logits(model) -> np.ndarray:
    return np.array(model(mx.array(PROMPTS, dtype=mx.int32)).astype(mx.float32))


# |converted - transformers float32| / max|logit|, measured: float32 9.5e-6; float16 0.049 and bfloat16 0.21,
# where transformers' own float16 / bfloat16 model is 0.032 / 0.27 away (this random model amplifies
# rounding: its norms are scaled up). Bound: 1e-4 in float32, else twice transformers' own error.
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_float_dtypes_equal_the_source_cast_and_match_transformers(dtype, converted, source, hf_checkpoints):
    ours = logits(load_model(converted[dtype].path))
    assert np.array_equal(ours, logits(load_model(source, dtype=dtype)))
    torch_model = hf_checkpoints["full"][0]
    truth = reference.logits(torch_model, PROMPTS)
    scale = np.abs(truth).max()
    bound = (
        1e-4
        if dtype == "float32"
        else 2
        * np.abs(reference.logits(copy.deepcopy(torch_model).to(getattr(torch, dtype)), PROMPTS) - truth).max()
        / scale
    )
    assert np.abs(ours - truth).max() / scale < bound
    assert converted[dtype].bits_per_weight == pytest.approx({"float32": 32, "float16": 16, "bfloat16": 16}[dtype])


# Top-1 agreement with the float32 model over PROMPTS (96 positions), measured on the tame checkpoint:
# q8 0.958 (bfloat16 alone: 0.958), q4 (default recipe) 0.750 (uniform 4-bit: 0.625), mxfp4 0.396;
# chance is 1/512. Hidden
# 64 is one quantization group per row, so 4 bits hurt far more here than at hidden 3840.
FLOORS = {"q8": 0.9, "q4": 0.65, "mxfp4": 0.3}


@pytest.mark.parametrize("name", list(FLOORS))
def test_quantized_models_agree_with_the_float_model(name, converted, tame):
    agreement = (logits(load_model(converted[name].path)).argmax(-1) == logits(load_model(tame)).argmax(-1)).mean()
    assert agreement >= FLOORS[name], agreement
    quantization = json.loads((converted[name].path / "config.json").read_text())["quantization"]
    assert quantization["bits"] == {"q4": 4, "q8": 8, "mxfp4": 4}[name]
    # measured 20.5, 9.8, 19.9: float32 media embedders (q4, mxfp4) and norms weigh a lot in so small a model
    assert converted[name].bits_per_weight < {"q4": 21, "q8": 10, "mxfp4": 20.5}[name]


def test_default_recipe_keeps_attention_and_embedding_at_6_bits_and_the_media_embedders_in_float(converted):
    model = load_model(converted["q4"].path)
    assert model.language_model.embed_tokens.bits == 6
    assert model.language_model.layers[0].self_attn.o_proj.bits == 6
    assert model.language_model.layers[0].mlp.up_proj.bits == 4
    assert model.embed_vision.patch_dense.weight.dtype == mx.float32
    assert model.embed_audio.embedding_projection.weight.dtype == mx.float32


def test_dequantize_round_trips(converted):
    quantized, floats = load_model(converted["q8"].path), load_model(converted["dequantized"].path)
    layer = quantized.language_model.layers[1].mlp.down_proj
    restored = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)
    assert mx.array_equal(floats.language_model.layers[1].mlp.down_proj.weight, restored)
    assert "quantization" not in json.loads((converted["dequantized"].path / "config.json").read_text())
    np.testing.assert_allclose(logits(floats), logits(quantized), atol=2e-3 * np.abs(logits(floats)).max())


def test_demo_converts_to_a_complete_sharded_folder_that_load_reads(demo_home, tmp_path):
    out = tmp_path / "sharded"
    convert(demo_home / "demo-v1", out, Options(quantize=True), quiet=True, shard_gb=0)  # 0: a tensor per shard
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 50 and sorted(set(index["weight_map"].values())) == shards
    assert all(not k.startswith("model.") for k in index["weight_map"])
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "README.md"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: mlx" in card and "--quant-recipe default" in card
    model, processor = load(out)
    ids = processor(text="Hello there", return_tensors="mlx")["input_ids"]
    assert model(ids).shape == (1, ids.shape[1], 262144)
    assert model.language_model.embed_tokens.bits == 6


def test_existing_destination_is_refused_without_force(source, tmp_path, capsys):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "notes.txt").write_text("mine")
    assert main(["convert", "--hf-path", str(source), "--mlx-path", str(tmp_path / "dst"), "--quiet"]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    with pytest.raises(InputError, match="not a model folder"):
        convert(source, tmp_path / "dst", force=True, quiet=True)
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["notes.txt"]
    with pytest.raises(InputError, match="either --quantize or --dequantize"):
        convert(source, tmp_path / "new", Options(quantize=True, dequantize=True), quiet=True)
    with pytest.raises(InputError, match="--q-mode mxfp4 means 4 bits"):
        convert(source, tmp_path / "new", Options(quantize=True, q_mode="mxfp4", q_bits=8), quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_a_file_at_the_destination_is_named_a_file_and_kept(force, demo_home, tmp_path, monkeypatch, capsys):
    """--mlx-path notes.txt: the error says it is a file, not a folder (not "pass --force"), and
    --force leaves the file as it was too."""
    monkeypatch.setenv("MLX_GEMMA4U_HOME", str(demo_home))
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert main(["convert", "--demo", "--mlx-path", str(notes), "--quiet", *force]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == f"error: {notes} is a file, not a folder; choose another --mlx-path for the converted model."
    assert notes.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_convert_demo_needs_no_source_and_converts_like_the_source(demo_home, tmp_path, monkeypatch, capsys):
    """`convert --demo`: the float conversion computes and generates exactly what the demo does; the
    8-bit one loads and generates, its logits off the float32 truth by at most 6x the demo's own
    bfloat16 rounding (relative RMS, measured: bfloat16 0.065, 8-bit 0.25, 3.8x; this random model
    amplifies rounding, and its 262,144 near-tied logits make top-1 agreement meaningless)."""
    monkeypatch.setenv("MLX_GEMMA4U_HOME", str(demo_home))
    same, q8 = tmp_path / "same", tmp_path / "q8"
    assert main(["convert", "--demo", "--mlx-path", str(same), "--quiet"]) == 0
    assert main(["convert", "--demo", "--mlx-path", str(q8), "-q", "--q-bits", "8", "--quiet"]) == 0
    assert demo.WARNING in capsys.readouterr().err
    card = (q8 / "README.md").read_text()
    assert demo.WARNING in card and "mlx-gemma4u convert --demo --mlx-path q8 -q" in card
    source, processor = load(demo_home / "demo-v1")
    ids = processor(text="Hello there, how are you today?", return_tensors="mlx")["input_ids"]
    converted, _ = load(same)
    assert mx.array_equal(converted(ids), source(ids))
    assert generate(converted, processor, "Hello", max_tokens=12) == generate(source, processor, "Hello", max_tokens=12)
    quantized, q_processor = load(q8)
    assert quantized.language_model.layers[0].mlp.up_proj.bits == 8
    assert generate(quantized, q_processor, "Hello", max_tokens=4)
    truth = np.array(load_model(demo_home / "demo-v1", dtype="float32")(ids))

    def error(model) -> float:
        return float(np.linalg.norm(np.array(model(ids).astype(mx.float32)) - truth) / np.linalg.norm(truth))

    assert error(quantized) < 6 * error(source)


@pytest.mark.parametrize(
    "options, message",
    [
        (Options(quantize=True, dequantize=True), "either --quantize or --dequantize"),
        (Options(quantize=True, q_mode="mxfp4", q_bits=8), "--q-mode mxfp4 means 4 bits"),
        (Options(quantize=True, q_mode="mxfp4", quant_recipe="mixed-6-4"), "affine only"),
        (Options(dtype="int8"), "--dtype must be one of"),
    ],
)
def test_contradicting_flags_are_refused_before_the_source_is_fetched(options, message, tmp_path, monkeypatch):
    monkeypatch.setattr("mlx_gemma4u.convert.converter.resolve", lambda path: pytest.fail(f"{path} was fetched"))
    with pytest.raises(InputError, match=message):
        convert("google/gemma-4-12B-it", tmp_path / "new", options, quiet=True)


# The child makes the second shard's write stall after half a file, says so, and is killed there.
STALL = """
import sys, time
from pathlib import Path
from mlx_gemma4u.convert import converter as c
real, written = c.write_safetensors, []
def stalling(path, tensors, done=lambda name, a: None):
    if written:
        Path(path).write_bytes(b"half a shard")
        print("writing", flush=True)
        time.sleep(60)
    written.append(path)
    real(path, tensors, done)
c.write_safetensors = stalling
c.convert(sys.argv[1], sys.argv[2], c.Options(quantize=True), force=True, quiet=True, shard_gb=0)
"""


@pytest.mark.parametrize("previous", [False, True])
def test_kill_9_mid_write_leaves_no_destination_or_the_previous_one(previous, source, converted, tmp_path):
    dst = tmp_path / "dst"
    if previous:
        shutil.copytree(converted["float16"].path, dst)
    before = {p.name: p.read_bytes() for p in dst.iterdir()} if previous else None
    kill_mid_write(STALL, str(source), str(dst))
    if previous:
        assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    else:
        assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")]  # the killed run's staging
    convert(source, dst, Options(quantize=True), force=True, quiet=True)  # the next run works and cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]
    assert load_model(dst).language_model.embed_tokens.bits == 6


class FakeHub(BaseHTTPRequestHandler):
    """The Hub API calls of create_repo + upload_folder: files come inline (base64) in the commit."""

    repos: dict = {}

    def do_POST(self):
        size = int(self.headers.get("Content-Length", 0))
        assert size < 64 << 20
        body = self.rfile.read(size)
        if self.path == "/api/repos/create":
            spec = json.loads(body)
            repo = f"{spec['organization']}/{spec['name']}"
            self.repos.setdefault(repo, {})
            return self.reply({"url": f"http://{self.headers['Host']}/{repo}"})
        if self.path == "/api/validate-yaml":
            return self.reply({"errors": [], "warnings": []})
        parts = self.path.split("/")  # /api/models/{user}/{name}/{preupload|commit}/{revision}
        repo, action = f"{parts[3]}/{parts[4]}", parts[5]
        if action == "preupload":
            files = json.loads(body)["files"]
            return self.reply(
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                self.repos[repo][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        self.reply({"commitUrl": f"http://{self.headers['Host']}/{repo}/commit/1", "commitOid": "1" * 40})

    def reply(self, data: dict) -> None:
        raw = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    yield FakeHub.repos
    server.shutdown()
    FakeHub.repos.clear()


def test_upload_sends_every_file_to_the_hub(source, tmp_path, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    summary = convert(source, tmp_path / "up", Options(dtype="bfloat16"), upload_repo="me/tiny-mlx", quiet=True)
    local = {p.name: p.read_bytes() for p in (tmp_path / "up").iterdir()}
    assert hub["me/tiny-mlx"] == local and "model.safetensors" in local
    assert summary.url.endswith("/me/tiny-mlx")


def test_upload_without_token_or_hub_is_one_sentence(source, tmp_path, hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token either
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(UploadError, match="needs a Hugging Face token"):
        convert(source, tmp_path / "a", upload_repo="me/x", quiet=True)
    assert not (tmp_path / "a").exists()  # refused before any work
    with pytest.raises(UploadError, match="must look like USER/NAME"):
        convert(source, tmp_path / "a", upload_repo="just-a-name", quiet=True)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(UploadError, match=r"Could not upload .* to me/x on http://127\.0\.0\.1:9"):
        convert(source, tmp_path / "b", upload_repo="me/x", quiet=True)
    assert (tmp_path / "b" / "config.json").is_file()  # the conversion itself is kept


def test_cli_shows_the_phases_and_a_summary(source, tmp_path, capsys):
    assert main(["convert", "--hf-path", str(source), "--mlx-path", str(tmp_path / "cli"), "-q"]) == 0
    err = capsys.readouterr().err
    for phase in ("reading", "quantizing", "converting", "writing"):
        assert phase in err, phase
    assert "GB on disk" in err and "bits per weight" in err
    assert oct((tmp_path / "cli").stat().st_mode & 0o777) == oct(0o777 & ~current_umask())


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
