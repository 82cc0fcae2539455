"""The generation loop on the demo checkpoint: prompts, prompt cache, sampling, stops, cache files."""

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4u import generate, load, stream_generate
from mlx_gemma4u.errors import InputError
from mlx_gemma4u.generation.inputs import prepare_inputs
from mlx_gemma4u.generation.prompt_cache import PromptCache
from mlx_gemma4u.generation.steps import prefill_chunks


@pytest.fixture(scope="module")
def demo(demo_home):
    return load(demo_home / "demo-v1")


def tokens(model, processor, prompt, **kwargs):
    return [r.token for r in stream_generate(model, processor, prompt, **kwargs)]


def test_prompt_forms_have_bos_exactly_once(demo):
    model, processor = demo
    for prompt in ("Hello", "<bos>Hello", [2, 9259], [9259], [{"role": "user", "content": "Hello"}]):
        ids = prepare_inputs(processor, prompt)["input_ids"][0].tolist()
        assert ids[0] == 2 and ids.count(2) == 1, prompt
    chat = prepare_inputs(processor, [{"role": "user", "content": "Hello"}])["input_ids"][0].tolist()
    assert chat[1] == 105 and chat[-3:] == [105, 4368, 107]  # <|turn>model\n: the generation prompt


def test_string_prompt_placeholders_are_expanded(demo, fixtures_dir):
    model, processor = demo
    inputs = prepare_inputs(processor, "Look: <|image|>", images=[str(fixtures_dir / "images/tiny_coffee_40x27.png")])
    ids = inputs["input_ids"][0].tolist()
    n = ids.count(258880)
    assert n > 1 and inputs["pixel_values"].shape[0] == 1
    assert int((inputs["mm_token_type_ids"] == 1).sum().item()) == n


def test_multi_turn_cache_prefills_only_new_tokens_and_matches_a_cold_run(demo):
    model, processor = demo
    cache = PromptCache(model)
    turn1 = [{"role": "user", "content": "Name a colour."}]
    reply = generate(model, processor, turn1, max_tokens=6, prompt_cache=cache)
    turn2 = turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Another one."}]
    warm = list(stream_generate(model, processor, turn2, max_tokens=10, prompt_cache=cache))
    cold = list(stream_generate(model, processor, turn2, max_tokens=10))
    assert [r.token for r in warm] == [r.token for r in cold]
    assert cold[0].prefilled_tokens == cold[0].prompt_tokens
    assert warm[0].prefilled_tokens == warm[0].prompt_tokens - cache.reused
    assert 0 < warm[0].prefilled_tokens < warm[0].prompt_tokens - 5


def test_prompt_cache_round_trips_through_a_file(demo, tmp_path):
    model, processor = demo
    cache = PromptCache(model)
    prompt = [{"role": "user", "content": "Tell me a story."}]
    generate(model, processor, prompt, max_tokens=4, prompt_cache=cache)
    cache.save(tmp_path / "chat.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["chat.safetensors"]
    loaded = PromptCache.load(tmp_path / "chat.safetensors", model)
    assert loaded.tokens == cache.tokens
    follow = prompt + [{"role": "assistant", "content": "Once"}, {"role": "user", "content": "Go on."}]
    assert tokens(model, processor, follow, max_tokens=5, prompt_cache=loaded) == tokens(
        model, processor, follow, max_tokens=5
    )


@pytest.mark.parametrize("name", ["conv", "conv.bin", "deeper/folder/conv.safetensors"])
def test_prompt_cache_saves_under_any_name(name, demo, tmp_path):
    model, processor = demo
    cache = PromptCache(model)
    generate(model, processor, "Hi", max_tokens=2, prompt_cache=cache)
    cache.save(tmp_path / name)
    assert [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()] == [name]
    assert PromptCache.load(tmp_path / name, model).tokens == cache.tokens


def test_a_failed_prompt_cache_save_leaves_nothing(demo, tmp_path, monkeypatch):
    import mlx_gemma4u.generation.prompt_cache

    real = mlx_gemma4u.generation.prompt_cache.save_prompt_cache

    def write_then_fail(*args, **kwargs):
        real(*args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(mlx_gemma4u.generation.prompt_cache, "save_prompt_cache", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        PromptCache(demo[0]).save(tmp_path / "conv")
    assert list(tmp_path.iterdir()) == []


def test_quantized_kv_cache_runs_and_stays_close(demo):
    model, processor = demo
    prompt = [{"role": "user", "content": "Count to ten."}]
    plain = list(stream_generate(model, processor, prompt, max_tokens=3))
    quant = list(stream_generate(model, processor, prompt, max_tokens=3, kv_bits=8))
    assert quant[0].token == plain[0].token  # the first token comes before any quantized key is read
    assert len(quant) == 3


def test_seeded_sampling_is_reproducible(demo):
    model, processor = demo
    prompt = [{"role": "user", "content": "Hi"}]
    a = tokens(model, processor, prompt, max_tokens=8, temperature=1.0, seed=7)
    b = tokens(model, processor, prompt, max_tokens=8, temperature=1.0, seed=7)
    c = tokens(model, processor, prompt, max_tokens=8, temperature=1.0, seed=8)
    assert a == b and a != c


class CraftedModel:
    """Stands in for the model: every step's logits are the same crafted distribution."""

    embeds_inputs = True

    def __init__(self, logits):
        self.logits = mx.array(logits, dtype=mx.float32)
        self.config = SimpleNamespace(text=SimpleNamespace(max_position_embeddings=10**6))

    def make_cache(self):
        return []

    def embed(self, input_ids, **media):
        return mx.zeros((*input_ids.shape, 1))

    def __call__(self, input_ids, cache=None, logits_to_keep=0, **kwargs):
        return mx.broadcast_to(self.logits, (1, 1, self.logits.shape[0]))


@pytest.mark.parametrize(
    "option, allowed",
    [
        ({"top_k": 2}, {10, 11}),
        ({"top_p": 0.6}, {10, 11}),  # probabilities 0.4, 0.3, 0.2, 0.1: 0.4 + 0.3 covers 0.6
        ({"min_p": 0.6}, {10, 11}),  # 0.3 / 0.4 >= 0.6, 0.2 / 0.4 < 0.6
        ({}, {10, 11, 12, 13}),
    ],
)
def test_sampling_options_bound_the_tokens_drawn(demo, option, allowed):
    _, processor = demo
    probs = np.zeros(20)
    probs[10:14] = [0.4, 0.3, 0.2, 0.1]
    model = CraftedModel(np.log(np.maximum(probs, 1e-30)))
    drawn = set(tokens(model, processor, [5, 6], max_tokens=400, temperature=1.0, seed=0, **option))
    assert drawn == allowed


def test_stop_strings_and_eos(demo):
    model, processor = demo
    prompt = [{"role": "user", "content": "Hi"}]
    full = generate(model, processor, prompt, max_tokens=12)
    stop = full[4:7]
    out = list(stream_generate(model, processor, prompt, max_tokens=12, stop=[stop]))
    assert "".join(r.text for r in out) == full[: full.index(stop)]
    assert out[-1].finish_reason == "stop"
    eos = CraftedModel(np.where(np.arange(20) == 1, 0.0, -1e9))  # always <eos>
    out = list(stream_generate(eos, processor, [5], max_tokens=5))
    assert len(out) == 1 and out[0].text == "" and out[0].finish_reason == "stop"


def test_prefill_chunks_never_split_a_vision_block():
    blocks = np.array([-1, -1, 0, 0, 0, 0, -1, 1, 1, -1, -1])
    assert prefill_chunks(0, 11, 3, blocks) == [(0, 6), (6, 9), (9, 11)]
    assert prefill_chunks(4, 11, 100, blocks) == [(4, 11)]


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.0}, "min_p"),
        ({"kv_bits": 3}, "kv_bits"),
    ],
)
def test_bad_generation_arguments(demo, kwargs, needle):
    model, processor = demo
    with pytest.raises(InputError, match=needle):
        list(stream_generate(model, processor, "Hi", **kwargs))


def test_bad_prompts(demo):
    model, processor = demo
    for prompt in ("", [], 3.5, [{"role": "user", "content": "x"}, "y"]):
        with pytest.raises(InputError):
            list(stream_generate(model, processor, prompt))


def test_a_turn_that_rewrites_the_last_reply_rewinds_a_wrapped_cache(hf_checkpoints):
    """The next turn keeps only part of the reply (as a chat template that trims it would): the
    cache, already wrapped on its window of 8, takes back the rest instead of starting over."""
    from mlx_gemma4u.generation.api import stream_inputs
    from mlx_gemma4u.generation.params import SamplingParams
    from mlx_gemma4u.weights.loading import load_model

    model = load_model(hf_checkpoints["full"][1])

    def run(ids, cache):
        inputs = {"input_ids": mx.array([ids], dtype=mx.int32)}
        return [r.token for r in stream_inputs(model, None, inputs, SamplingParams(max_tokens=10), cache)]

    turn1 = list(range(30, 60))
    cache = PromptCache(model)
    reply = run(turn1, cache)
    turn2 = turn1 + reply[:5] + [70, 71, 72, 73, 74, 75]
    warm = run(turn2, cache)
    assert cache.reused == len(turn1) + 5  # 4 cached reply tokens were taken back
    assert warm == run(turn2, PromptCache(model))


def test_multi_turn_with_an_image_reuses_the_image_tokens(demo, fixtures_dir):
    model, processor = demo
    image = str(fixtures_dir / "images/tiny_coffee_40x27.png")
    turn1 = [{"role": "user", "content": [{"type": "image", "path": image}, {"type": "text", "text": "What is it?"}]}]
    cache = PromptCache(model)
    reply = generate(model, processor, turn1, max_tokens=5, prompt_cache=cache)
    turn2 = turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And the colour?"}]
    warm = list(stream_generate(model, processor, turn2, max_tokens=6, prompt_cache=cache))
    cold = list(stream_generate(model, processor, turn2, max_tokens=6))
    assert [r.token for r in warm] == [r.token for r in cold]
    assert cache.reused > 250  # the image's soft tokens and the first turn stayed cached
    assert warm[0].prefilled_tokens == warm[0].prompt_tokens - cache.reused


def test_prompt_longer_than_the_context_is_refused(demo, monkeypatch):
    model, processor = demo
    monkeypatch.setattr(model.config.text, "max_position_embeddings", 20)
    with pytest.raises(InputError, match="exceeds the model's context of 20 tokens"):
        list(stream_generate(model, processor, "Hello there", max_tokens=18))


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_each_step_yields_the_log_probabilities_of_its_token(demo, temperature):
    """Greedy steps take their token off the raw logits and leave the log-probabilities lazy; either
    way these are the float32 log-softmax of the model's logits, and the greedy token their argmax."""
    model, processor = demo
    ids = [2, 9259, 1902, 236764]
    first = next(stream_generate(model, processor, ids, max_tokens=1, temperature=temperature, seed=0))
    logits = model(mx.array([ids], dtype=mx.int32))[0, -1].astype(mx.float32)
    expected = logits - mx.logsumexp(logits)
    assert first.logprobs.dtype == mx.float32
    assert mx.abs(first.logprobs - expected).max().item() < 1e-5
    if temperature == 0:
        assert first.token == mx.argmax(expected).item()


def test_kv_bits_decode_reads_and_extends_the_quantized_caches(demo):
    """With kv_bits the decode steps run on the quantized full-attention caches, which end up holding
    every token the prompt cache lists (not just the prompt)."""
    model, processor = demo
    cache = PromptCache(model, kv_bits=8)
    generate(model, processor, "Count to ten.", max_tokens=5, prompt_cache=cache)
    quantized = [c for c in cache.caches if type(c).__name__ == "QuantizedKVCache"]
    assert quantized and all(c.offset == len(cache.tokens) for c in cache.caches)


def test_a_prompt_cache_never_reuses_the_keys_of_other_media(demo, fixtures_dir, tmp_path):
    """Two prompts alike token for token but for their image (the mirror of the other, same size,
    so the same placeholders): the cache keeps at most the text before the image, and the reply is
    the cold one; the same image again reuses all but a few tokens."""
    from PIL import Image, ImageOps

    model, processor = demo
    photo = fixtures_dir / "images/tiny_coffee_40x27.png"
    mirrored = tmp_path / "mirrored.png"
    ImageOps.mirror(Image.open(photo)).save(mirrored)

    def prompt(path):
        content = [{"type": "text", "text": "Look at this:"}, {"type": "image", "path": str(path)}]
        return [{"role": "user", "content": content}]

    cache = PromptCache(model)
    list(stream_generate(model, processor, prompt(photo), max_tokens=4, prompt_cache=cache))
    warm = list(stream_generate(model, processor, prompt(mirrored), max_tokens=8, prompt_cache=cache))
    cold = tokens(model, processor, prompt(mirrored), max_tokens=8)
    ids = prepare_inputs(processor, prompt(mirrored))["input_ids"][0].tolist()
    first_image = ids.index(258880)  # the first image placeholder
    assert [r.token for r in warm] == cold
    # at most the text before the image is kept (here none: the sliding layers cannot rewind that far)
    assert warm[0].prompt_tokens - warm[0].prefilled_tokens <= first_image
    again = list(stream_generate(model, processor, prompt(mirrored), max_tokens=8, prompt_cache=cache))
    assert [r.token for r in again] == cold
    assert again[0].prefilled_tokens < 10
