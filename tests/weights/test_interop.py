"""Interop with the real peers, both ways: folders mlx-vlm 0.7.10 (and mlx-lm) convert load here with
mlx-vlm's own logits, and what our converter writes loads in mlx-vlm with ours.

Measured on the demo checkpoint (bfloat16): text prompts give bit-identical logits (0.0) in every
folder. For image and audio prompts the decoder is bit-identical too when both are given the same
soft tokens; the soft tokens themselves differ by design: ours round the media to the model dtype as
transformers' bfloat16 model does, mlx-vlm's keep float32 activations. Both stay within the stated
distance of a float64 computation of the same embedder on the same (dequantized) weights.
"""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf

from mlx_gemma4u import load
from mlx_gemma4u.convert.converter import Options, convert
from mlx_gemma4u.errors import CheckpointError, InputError
from mlx_gemma4u.models import layouts as checkpoints
from mlx_gemma4u.weights.loading import load_model

mlx_vlm_utils = pytest.importorskip("mlx_vlm.utils", reason="mlx-vlm (the test extra) is not installed")

PEER_CONVERSIONS = {
    "4bit": {"q_bits": 4},
    "8bit": {"q_bits": 8},
    "mxfp8": {"q_bits": 8, "q_group_size": 32, "q_mode": "mxfp8"},
    "nvfp4": {"q_bits": 4, "q_group_size": 16, "q_mode": "nvfp4"},
    "mixed_4_6": {"quant_predicate": "mixed_4_6"},  # per-module bits in config.json's "quantization"
}
OUR_RECIPES = {
    "default": Options(quantize=True),
    "uniform": Options(quantize=True, quant_recipe="uniform"),
    "mixed-8-4": Options(quantize=True, quant_recipe="mixed-8-4"),
    "qat": Options(quantize=True, quant_recipe="qat"),
    "uniform-8bit": Options(quantize=True, q_bits=8, quant_recipe="uniform"),
    "mxfp4": Options(quantize=True, q_mode="mxfp4", quant_recipe="uniform"),
    "bfloat16": Options(dtype="bfloat16"),
}
# Largest |soft token - float64 reference| / max |reference| measured over these folders on these prompts:
# ours 0.0110, mlx-vlm 0.0091 (both the image path of the uniform recipe, whose media layers are 4-bit);
# with float media layers ours is 0.0058 (bfloat16 activations, as transformers' bfloat16 model), mlx-vlm 0.0001.
SOFT_TOKEN_BOUND = 0.02
KEEP = 1  # the last position's logits only: a quantized 262k-wide head is slow on MLX's CPU backend
IMAGE_TOKENS = 70  # a short image prompt (the default budget is 280): the decoder runs twice per folder
AUDIO_SECONDS = 1.5


@pytest.fixture(scope="module")
def demo(demo_home) -> Path:
    return demo_home / "demo-v1"


@pytest.fixture(scope="module")
def peer_folders(demo, tmp_path_factory) -> dict[str, Path]:
    """The demo converted by mlx-vlm 0.7.10 itself, as mlx-community's conversions are made."""
    from mlx_vlm.convert import convert as vlm_convert

    root = tmp_path_factory.mktemp("mlx-vlm")
    for name, flags in PEER_CONVERSIONS.items():
        vlm_convert(str(demo), str(root / name), quantize=True, **flags)
    return {name: root / name for name in PEER_CONVERSIONS}


@pytest.fixture(scope="module")
def our_folders(demo, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ours")
    return {name: convert(demo, root / name, options, quiet=True).path for name, options in OUR_RECIPES.items()}


@pytest.fixture(scope="module")
def prompts(demo, fixtures_dir) -> dict[str, dict]:
    """A text, an image and an audio prompt as the processor makes them (media arrays included)."""
    _, processor = load(demo)
    speech, _ = sf.read(fixtures_dir / "audio/speech_16k_mono.wav", dtype="float32")
    made = {
        "text": processor(text="<bos>Hello there, how are you today?", return_tensors="mlx"),
        "image": processor(
            text="<bos>Describe <|image|>",
            images=[str(fixtures_dir / "images/tiny_coffee_40x27.png")],
            max_soft_tokens=IMAGE_TOKENS,
            return_tensors="mlx",
        ),
        "audio": processor(
            text="<bos>Transcribe <|audio|>",
            audio=[speech[: int(16000 * AUDIO_SECONDS)]],
            return_tensors="mlx",
        ),
    }
    return {
        name: {k: v for k, v in inputs.items() if k not in ("attention_mask", "mm_token_type_ids")}
        for name, inputs in made.items()
    }


def _check_same_as_mlx_vlm(folder: Path, prompts: dict) -> None:
    """Text logits identical; media: the decoder identical on the same soft tokens, and both
    implementations' soft tokens close to the float64 embedder."""
    ours, theirs = load_model(folder), mlx_vlm_utils.load_model(folder)
    for name, inputs in prompts.items():
        inputs = dict(inputs)
        ids = inputs.pop("input_ids")
        if name == "text":
            assert np.array_equal(_np(ours(ids, logits_to_keep=KEEP)), _np(theirs(ids, logits_to_keep=KEEP).logits))
            continue
        embeds = ours.embed(ids, **inputs)
        assert np.array_equal(
            _np(ours(ids, inputs_embeds=embeds, logits_to_keep=KEEP)),
            _np(theirs.language_model(None, inputs_embeds=embeds, logits_to_keep=KEEP).logits),
        )
        if name == "image":
            mine = ours.embed_vision(inputs["pixel_values"], inputs["image_position_ids"])
            peer = theirs.get_image_features(inputs["pixel_values"], inputs["image_position_ids"])
            truth = _vision_float64(ours, inputs["pixel_values"], inputs["image_position_ids"])
        else:
            mine = ours.embed_audio(inputs["input_features"], inputs["input_features_mask"])
            peer = theirs.get_audio_features(inputs["input_features"], inputs["input_features_mask"])
            truth = _audio_float64(ours, inputs["input_features"], inputs["input_features_mask"])
        scale = np.abs(truth).max()
        for soft in (mine, peer):
            assert np.abs(_np(soft) - truth).max() / scale < SOFT_TOKEN_BOUND, (folder.name, name)


@pytest.mark.parametrize("name", list(PEER_CONVERSIONS))
def test_mlx_vlm_conversions_load_with_mlx_vlm_logits(name, peer_folders, prompts):
    _check_same_as_mlx_vlm(peer_folders[name], prompts)


@pytest.mark.parametrize("recipe", list(OUR_RECIPES))
def test_our_conversions_load_in_mlx_vlm_with_our_logits(recipe, our_folders, prompts):
    _check_same_as_mlx_vlm(our_folders[recipe], prompts)


def test_mlx_vlm_builds_its_processor_from_our_folder(our_folders):
    folder = our_folders["default"]
    _, processor = mlx_vlm_utils.load(str(folder))  # reads the processor_config.json we write
    assert type(processor).__name__ == "Gemma4UnifiedProcessor"
    assert processor.image_processor.max_soft_tokens == 280
    assert "mlx-vlm" in (folder / "README.md").read_text()


def test_qat_recipe_is_4_bit_groups_of_32_on_the_decoder_projections(our_folders):
    model = load_model(our_folders["qat"])
    layer = model.language_model.layers[0]
    assert (layer.mlp.down_proj.bits, layer.mlp.down_proj.group_size) == (4, 32)
    assert (layer.self_attn.q_proj.bits, layer.self_attn.q_proj.group_size) == (4, 32)
    assert model.language_model.embed_tokens.bits == 8
    assert model.embed_vision.patch_dense.weight.dtype == mx.bfloat16


def test_qat_source_gets_the_qat_recipe_unless_flags_say_otherwise(demo, tmp_path):
    qat = tmp_path / "gemma-4-demo-qat-q4_0-unquantized"
    shutil.copytree(demo, qat)
    out = convert(qat, tmp_path / "auto", Options(quantize=True), quiet=True).path
    assert json.loads((out / "config.json").read_text())["quantization"]["group_size"] == 32
    assert "--quant-recipe qat" in (out / "README.md").read_text()
    out = convert(qat, tmp_path / "eight", Options(quantize=True, q_bits=8), quiet=True).path
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    with pytest.raises(InputError, match="qat recipe means 4-bit"):
        convert(qat, tmp_path / "bad", Options(quantize=True, q_bits=8, quant_recipe="qat"), quiet=True)


def test_mlx_vlm_folder_round_trips_through_our_converter(peer_folders, tmp_path):
    """Dequantize, then requantize at the same settings (in two runs, or in one straight from the
    quantized folder): every weight lands within one quantization step of the original.

    Not bit for bit: the dequantized values are rounded to bfloat16, which moves some groups' min and
    max off the old grid; measured 84% of the 4-bit codes unchanged, at most 0.81 of a step apart.
    """
    source = peer_folders["4bit"]
    floats = convert(source, tmp_path / "floats", Options(dequantize=True), quiet=True).path
    again = convert(floats, tmp_path / "again", Options(quantize=True, quant_recipe="uniform"), quiet=True).path
    direct = convert(source, tmp_path / "direct", Options(quantize=True, quant_recipe="uniform"), quiet=True).path
    original = mx.load(str(source / "model.safetensors"))
    requantized, straight = mx.load(str(again / "model.safetensors")), mx.load(str(direct / "model.safetensors"))
    assert set(requantized) == set(straight) and all(mx.array_equal(requantized[k], straight[k]) for k in straight)
    layers = [k.removesuffix(".scales") for k in original if k.endswith(".scales")]
    assert len(layers) == 43  # 41 decoder projections, the token embedding, the audio projection
    for layer in layers:
        before, after = (
            mx.dequantize(w[f"{layer}.weight"], w[f"{layer}.scales"], w[f"{layer}.biases"], 64, 4)
            for w in (original, requantized)
        )
        step = mx.repeat(original[f"{layer}.scales"], 64, axis=-1)
        assert (mx.abs(before - after) <= mx.abs(step)).all().item(), layer
    dequantized = mx.load(str(floats / "model.safetensors"))
    assert all(
        mx.array_equal(
            dequantized[f"{layer}.weight"],
            mx.dequantize(original[f"{layer}.weight"], original[f"{layer}.scales"], original[f"{layer}.biases"], 64, 4),
        )
        for layer in layers
    )


def test_text_only_mlx_lm_conversion_loads_and_refuses_media(demo, prompts, tmp_path):
    from mlx_lm import convert as lm_convert
    from mlx_lm.utils import load_model as lm_load_model  # the model alone: its tokenizer is not under test

    lm_convert(str(demo), str(tmp_path / "text"), quantize=True)
    model = load_model(tmp_path / "text")
    ids = prompts["text"]["input_ids"]
    peer, _ = lm_load_model(tmp_path / "text")
    assert np.array_equal(_np(model(ids)), _np(peer(ids)))
    image = dict(prompts["image"])
    with pytest.raises(InputError, match="no vision weights"):
        model(image.pop("input_ids"), **image)
    audio = dict(prompts["audio"])
    with pytest.raises(InputError, match="no audio weights"):
        model(audio.pop("input_ids"), **audio)


def test_our_earlier_layout_still_loads(our_folders, prompts, tmp_path):
    """What this package's converter wrote before it wrote mlx-community's layout: our module paths."""
    folder = tmp_path / "v1"
    shutil.copytree(our_folders["default"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization"] = checkpoints.quantization_in_our_names(config["quantization"], checkpoints.COMMUNITY)
    (folder / "config.json").write_text(json.dumps(config))
    weights = mx.load(str(folder / "model.safetensors"))
    mx.save_safetensors(
        str(folder / "model.safetensors"), {checkpoints.COMMUNITY.ours(k): v for k, v in weights.items()}
    )
    (folder / "model.safetensors.index.json").unlink()
    assert checkpoints.detect(mx.load(str(folder / "model.safetensors"))) is checkpoints.OURS_V1
    ids = prompts["text"]["input_ids"]
    old, new = load_model(folder), load_model(our_folders["default"])
    assert old.language_model.embed_tokens.bits == 6
    assert np.array_equal(_np(old(ids, logits_to_keep=KEEP)), _np(new(ids, logits_to_keep=KEEP)))


def test_unknown_layout_names_the_first_key_it_cannot_place(demo, tmp_path):
    folder = tmp_path / "odd"
    shutil.copytree(demo, folder)
    weights = mx.load(str(folder / "model.safetensors"))
    mx.save_safetensors(str(folder / "model.safetensors"), {f"transformer.{k}": v for k, v in weights.items()})
    with pytest.raises(CheckpointError, match="cannot place 'transformer.model.embed_audio"):
        load_model(folder)


def _np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def _float64(layer) -> np.ndarray:
    """A (possibly quantized) layer's weight as float64."""
    weight = layer.weight
    if hasattr(layer, "scales"):
        weight = mx.dequantize(
            weight, layer.scales, getattr(layer, "biases", None), layer.group_size, layer.bits, mode=layer.mode
        )
    return _np(weight).astype(np.float64)


def _layer_norm(x: np.ndarray, norm, eps: float = 1e-5) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * _np(norm.weight) + _np(norm.bias)


def _project(x: np.ndarray, embedder, eps: float = 1e-6) -> np.ndarray:
    """The scale-free RMSNorm and projection shared by both media."""
    return (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)) @ _float64(embedder.embedding_projection).T


def _vision_float64(model, pixel_values, position_ids) -> np.ndarray:
    e, positions = model.embed_vision, np.array(position_ids)
    h = _layer_norm(_np(pixel_values).astype(np.float64), e.patch_ln1)
    h = _layer_norm(h @ _float64(e.patch_dense).T + _np(e.patch_dense.bias), e.patch_ln2)
    table, valid, at = _np(e.pos_embedding).astype(np.float64), positions != -1, np.maximum(positions, 0)
    h = h + table[at[..., 0], 0] * valid[..., :1] + table[at[..., 1], 1] * valid[..., 1:]
    return _project(_layer_norm(h, e.pos_norm)[np.all(valid, axis=-1)], e.multimodal_embedder)


def _audio_float64(model, features, mask) -> np.ndarray:
    return _project(_np(features).astype(np.float64)[np.array(mask).astype(bool)], model.embed_audio)
