"""Converting an MTP assistant (drafter): float dtypes equal the source loaded directly, quantized
drafters stay close to it, and what must stay float (projections, centroid scorer, norms) does.

Checkpoints: a tiny text-only target (tests/support/reference.py's "plain") and two random assistants for it
(tests/support/draft_reference.py), one with the tied head, one with the centroid head (16 centroids of 32
tokens, top 4). Their hidden size is 64, so every layer is quantizable in groups of 32 or 64 and
keeping the projections and the centroid scorer float is a choice of the converter, not of their shapes.
"""

import json
import shutil

import draft_reference as dr
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import reference

from mlx_gemma4u.cli.main import main
from mlx_gemma4u.convert.converter import Options, convert
from mlx_gemma4u.errors import InputError
from mlx_gemma4u.weights.loading import load_draft_model, load_model

TARGET = reference.TEXT_CONFIGS["plain"]
HEADS = {"tied": dict(seed=5), "ordered": dict(seed=6, ordered=True)}
CONVERSIONS = {
    "float32": Options(dtype="float32"),
    "bfloat16": Options(dtype="bfloat16"),
    "q4": Options(quantize=True),  # default recipe: MLP at 4 bits, attention and embedding at 6, groups of 64
    "q8": Options(quantize=True, q_bits=8, q_group_size=32),
}
# (group size, embedding bits, attention bits, MLP bits) of each quantized conversion
EXPECTED_BITS = {"q4": (64, 6, 6, 4), "q8": (32, 8, 8, 8)}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """-> (the target Model, {head: the saved transformers assistant folder})."""
    root = tmp_path_factory.mktemp("draft-convert")
    with dr.kv_sharing_5_24():
        target = reference.build(TARGET, seed=3, multimodal=False)
        assistants = {head: dr.build_assistant(TARGET, hidden=64, **kw) for head, kw in HEADS.items()}
    model = load_model(reference.save(target, root / "target"))
    return model, {head: dr.save(a, root / head) for head, a in assistants.items()}


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    """(head, conversion name) -> the converted folder."""
    root = tmp_path_factory.mktemp("draft-converted")
    return {
        (head, name): convert(src, root / f"{head}-{name}", options, quiet=True).path
        for head, src in sources[1].items()
        for name, options in CONVERSIONS.items()
    }


@pytest.fixture(scope="module")
def states(sources):
    """The target's state after 8 random 20-token prompts: (last token, hidden state, shared_kv) each."""
    model = sources[0]
    out = []
    for ids in np.random.default_rng(0).integers(3, 400, size=(8, 20)):
        cache = model.make_cache()
        logits, hidden = model(mx.array(ids[None], dtype=mx.int32), cache=cache, return_hidden=True)
        out.append((mx.argmax(logits[0, -1:], axis=-1).astype(mx.int32), hidden[:, -1:], model.shared_kv(cache)))
    return out


def first_drafts(drafter, target, states) -> tuple[np.ndarray, np.ndarray]:
    """The first draft step after each state -> (logits (8, vocab), projected hidden states (8, Dt)), float32."""
    logits, hidden = [], []
    for token, h, shared_kv in states:
        step = drafter.attend_to(shared_kv, next(iter(shared_kv.values())).offset)
        out, h = drafter(target.language_model.embed(token[None]), h, step)
        logits.append(np.array(out.astype(mx.float32))[0, 0])
        hidden.append(np.array(h.astype(mx.float32))[0, 0])
    return np.stack(logits), np.stack(hidden)


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_float_conversions_equal_the_source_loaded_directly(head, dtype, converted, sources, states):
    target, folders = sources
    ours = load_draft_model(converted[head, dtype])
    direct = load_draft_model(folders[head], dtype=dtype)
    for got, want in zip(first_drafts(ours, target, states), first_drafts(direct, target, states)):
        assert np.array_equal(got, want)
    assert ours.model.embed_tokens.weight.dtype == getattr(mx, dtype)
    assert "quantization" not in json.loads((converted[head, dtype] / "config.json").read_text())


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("name", list(EXPECTED_BITS))
def test_quantized_assistant_keeps_projections_centroids_norms_and_ordering_float(head, name, converted, sources):
    drafter = load_draft_model(converted[head, name])
    group, embedding_bits, attention_bits, mlp_bits = EXPECTED_BITS[name]
    assert isinstance(drafter.model.embed_tokens, nn.QuantizedEmbedding)
    assert (drafter.model.embed_tokens.bits, drafter.model.embed_tokens.group_size) == (embedding_bits, group)
    for layer in drafter.model.layers:
        assert layer.self_attn.q_proj.bits == layer.self_attn.o_proj.bits == attention_bits
        assert layer.mlp.gate_proj.bits == layer.mlp.up_proj.bits == layer.mlp.down_proj.bits == mlp_bits
        assert layer.input_layernorm.weight.dtype == layer.self_attn.q_norm.weight.dtype == mx.float32
    kept = [drafter.pre_projection, drafter.post_projection]
    kept += [drafter.masked_embedding.centroids] if head == "ordered" else []
    assert all(isinstance(layer, nn.Linear) and layer.weight.dtype == mx.float32 for layer in kept)  # not quantized
    assert drafter.model.norm.weight.dtype == mx.float32
    stored = mx.load(str(converted[head, name] / "model.safetensors"))
    assert not any(
        k.startswith(("pre_projection.", "post_projection.", "masked_embedding.centroids."))
        and not k.endswith(".weight")
        for k in stored
    )
    quantization = json.loads((converted[head, name] / "config.json").read_text())["quantization"]
    assert (quantization["group_size"], quantization["bits"]) == (group, int(name[1:]))
    if head == "ordered":
        source = mx.load(str(sources[1][head] / "model.safetensors"))["masked_embedding.token_ordering"]
        for ordering in (stored["masked_embedding.token_ordering"], drafter.masked_embedding.token_ordering):
            assert ordering.dtype == mx.int32 and mx.array_equal(ordering, source).item()


# Against the float32 source over the 8 first draft steps, measured: q8 (groups of 32) logits 0.031
# (tied) and 0.026 (centroid head) of the largest logit, projected state 0.016 / 0.033; q4 (default
# recipe) 0.31 / 0.18 and 0.22 / 0.27 (hidden 64 is one or two groups per row, and these random
# weights amplify rounding: bfloat16 alone is 0.016 / 0.009 and 0.008 / 0.014 away). The centroid
# head's logits are compared on the tokens both choose (the others get the floor, min - 1); of the
# source's chosen tokens the quantized one chooses too: q8 0.97, q4 0.81.
BOUNDS = {"q8": (0.06, 0.06, 0.9), "q4": (0.45, 0.4, 0.7)}  # logits, hidden, centroid tokens kept


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("name", list(BOUNDS))
def test_quantized_drafts_stay_close_to_the_float_source(head, name, converted, sources, states):
    target, folders = sources
    logits, hidden = first_drafts(load_draft_model(converted[head, name]), target, states)
    want_logits, want_hidden = first_drafts(load_draft_model(folders[head]), target, states)
    logit_bound, hidden_bound, kept_floor = BOUNDS[name]
    both = np.ones_like(logits, dtype=bool)
    if head == "ordered":
        chosen = want_logits > want_logits.min(-1, keepdims=True)
        both = chosen & (logits > logits.min(-1, keepdims=True))
        assert both.sum() / chosen.sum() >= kept_floor
    assert np.abs(np.where(both, logits - want_logits, 0)).max() < logit_bound * np.abs(want_logits).max()
    assert np.abs(hidden - want_hidden).max() < hidden_bound * np.abs(want_hidden).max()


def test_cli_converts_an_assistant_folder(sources, tmp_path):
    """`mlx-gemma4u convert --hf-path <assistant folder>`; the model card says how to use the drafter."""
    folders = sources[1]
    out = tmp_path / "assistant-8bit"
    assert (
        main(
            [
                "convert",
                "--hf-path",
                str(folders["ordered"]),
                "--mlx-path",
                str(out),
                "-q",
                "--q-bits",
                "8",
                "--q-group-size",
                "32",
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads((out / "config.json").read_text())["model_type"] == "gemma4_unified_assistant"
    assert (out / "generation_config.json").is_file() and not (out / "processor_config.json").exists()
    card = (out / "README.md").read_text()
    assert "--draft-model" in card and "load_draft_model" in card and "image-text-to-text" not in card
    assert load_draft_model(out).model.embed_tokens.bits == 8


def test_qat_assistant_gets_the_qat_recipe(sources, tmp_path):
    """Google publishes QAT assistants (google/gemma-4-12B-it-qat-q4_0-unquantized-assistant): their name
    picks the qat recipe as for the target, decoder at 4 bits in groups of 32 and the embedding at 8."""
    source = tmp_path / "gemma-4-tiny-it-qat-q4_0-unquantized-assistant"
    shutil.copytree(sources[1]["ordered"], source)
    drafter = load_draft_model(convert(source, tmp_path / "out", Options(quantize=True), quiet=True).path)
    assert (drafter.model.layers[0].mlp.up_proj.bits, drafter.model.layers[0].mlp.up_proj.group_size) == (4, 32)
    assert drafter.model.layers[0].self_attn.q_proj.bits == 4
    assert (drafter.model.embed_tokens.bits, drafter.model.embed_tokens.group_size) == (8, 64)
    assert all(isinstance(m, nn.Linear) for m in (drafter.pre_projection, drafter.masked_embedding.centroids))


def test_layers_the_group_size_does_not_divide_stay_float(sources, states, tmp_path):
    """Groups of 128 on a 64-wide assistant: only the MLP's down projection (128 inputs) is quantized."""
    target, folders = sources
    drafter = load_draft_model(
        convert(folders["tied"], tmp_path / "g128", Options(quantize=True, q_group_size=128), quiet=True).path
    )
    layer = drafter.model.layers[0]
    assert isinstance(layer.mlp.down_proj, nn.QuantizedLinear)
    assert all(isinstance(m, nn.Linear) for m in (layer.mlp.up_proj, layer.self_attn.q_proj, layer.self_attn.o_proj))
    assert isinstance(drafter.model.embed_tokens, nn.Embedding)  # (nn.Quantized* are not nn.Linear / nn.Embedding)
    assert np.isfinite(first_drafts(drafter, target, states)[0]).all()


def test_dequantize_round_trips(converted, sources, states, tmp_path):
    target, _ = sources
    quantized = load_draft_model(converted["ordered", "q8"])
    floats = load_draft_model(
        convert(converted["ordered", "q8"], tmp_path / "float", Options(dequantize=True), quiet=True).path
    )
    layer = quantized.model.layers[1].mlp.down_proj
    restored = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)
    assert mx.array_equal(floats.model.layers[1].mlp.down_proj.weight, restored)
    got, want = first_drafts(floats, target, states)[0], first_drafts(quantized, target, states)[0]
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


def test_flags_that_do_not_apply_are_refused_in_one_sentence(sources, tmp_path):
    with pytest.raises(InputError, match=r"^--dequantize needs a quantized source; this one is not quantized\.$"):
        convert(sources[1]["tied"], tmp_path / "out", Options(dequantize=True), quiet=True)
    assert not (tmp_path / "out").exists()
