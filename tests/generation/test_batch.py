"""Batched generation on the demo checkpoint: every sequence gets exactly the tokens it gets alone."""

import mlx.core as mx
import pytest

from mlx_gemma4u import batch_generate, load, stream_generate
from mlx_gemma4u.errors import InputError
from mlx_gemma4u.generation.engine import BatchGenerator, kv_bytes
from mlx_gemma4u.generation.prompt_cache import PromptCache
from mlx_gemma4u.generation.steps import prefill


@pytest.fixture(scope="module")
def demo(demo_home):
    return load(demo_home / "demo-v1")


@pytest.fixture(scope="module")
def media(fixtures_dir):
    images, audio, video = fixtures_dir / "images", fixtures_dir / "audio", fixtures_dir / "video"
    return {
        "coffee": str(images / "tiny_coffee_40x27.png"),
        "rocket": str(images / "landscape_rocket_640x427.jpg"),
        "speech": str(audio / "speech_16k_mono.wav"),
        "video": str(next(video.glob("pan_coffee_240x160_15fps_2s*.webm"))),
    }


def alone(model, processor, prompt, **kwargs):
    """The reply stream_generate gives `prompt` on its own -> (tokens, text, finish reason)."""
    responses = list(stream_generate(model, processor, **prompt, **kwargs))
    return [r.token for r in responses], "".join(r.text for r in responses), responses[-1].finish_reason


def six_prompts(media):
    """Text, two images, audio, video and a chat with a system prompt, of different lengths."""
    return [
        {"prompt": "Once upon a time " * 28, "max_tokens": 40},  # decodes across the 128-token window
        {
            "prompt": [{"role": "user", "content": "Compare them."}],
            "images": [media["coffee"], media["rocket"]],
            "max_soft_tokens": 70,
            "max_tokens": 24,
        },
        {"prompt": [{"role": "user", "content": "Transcribe."}], "audio": media["speech"], "max_tokens": 20},
        {
            "prompt": [{"role": "user", "content": "What happens?"}],
            "videos": media["video"],
            "num_frames": 2,
            "max_soft_tokens": 70,
            "max_tokens": 16,
        },
        {
            "prompt": [
                {"role": "system", "content": "You answer in one word."},
                {"role": "user", "content": "Name a colour."},
            ],
            "max_tokens": 30,
        },
        {"prompt": "Hi", "max_tokens": 9},
    ]


def test_greedy_batch_equals_each_prompt_alone(demo, media):
    model, processor = demo
    prompts = six_prompts(media)
    batch = batch_generate(model, processor, prompts, max_batch=6)
    for prompt, response in zip(prompts, batch):
        settings = {k: v for k, v in prompt.items() if k != "prompt"}
        tokens, text, finish = alone(model, processor, {"prompt": prompt["prompt"]}, **settings)
        assert response.error is None
        assert response.tokens == tokens and response.text == text and response.finish_reason == finish
        assert response.generation_tokens == len(tokens) and response.prefilled_tokens == response.prompt_tokens
    assert batch[0].prompt_tokens < model.config.text.sliding_window < batch[0].prompt_tokens + len(batch[0].tokens)


def test_batched_rows_give_each_row_its_own_logits_bit_for_bit(demo):
    """One pass for all rows (Linears, norms and RoPE batched, RoPE at each row's own offset) gives
    every row exactly the logits of its own pass: before, at and past the 128-token sliding window,
    and with an 8-bit cache."""
    model, _ = demo
    lengths, kv_bits = [5, 127, 140, 60], [None, None, None, 8]

    def prefilled():
        caches = []
        for i, (n, bits) in enumerate(zip(lengths, kv_bits)):
            cache = PromptCache(model, bits)
            prefill(model, {"input_ids": mx.random.randint(10, 5000, (1, n), key=mx.random.key(i))}, cache)
            caches.append(cache.caches)
        return caches

    batched, single = prefilled(), prefilled()
    tokens = mx.array([[7], [80], [900], [4000]])
    for _ in range(3):
        got = model.rows(tokens, batched)
        want = mx.concatenate([model(tokens[i : i + 1], cache=cache) for i, cache in enumerate(single)])
        assert mx.array_equal(got, want)
        tokens = mx.argmax(got[:, -1], axis=-1)[:, None]


def test_joining_and_stopping_early_change_nothing_for_the_others(demo):
    model, processor = demo
    long = alone(model, processor, {"prompt": "The sea is"}, max_tokens=40)[0]
    other, other_text, _ = alone(model, processor, {"prompt": "Tell me"}, max_tokens=30)
    stop = other_text[8:12]
    assert len(stop) == 4
    generator = BatchGenerator(model, processor, max_batch=4)
    first = generator.submit("The sea is", max_tokens=40)
    short = generator.submit("Tell me", max_tokens=30, stop=[stop])
    for _ in range(10):
        generator.step()
    late = generator.submit("Tell me", max_tokens=30)  # joins while the others decode
    while not generator.done:
        generator.step()
    assert generator.responses[first].tokens == long
    stopped = generator.responses[short]
    assert stopped.finish_reason == "stop" and stopped.text == other_text[: other_text.find(stop)]
    assert len(stopped.tokens) < len(other) and stopped.tokens == other[: len(stopped.tokens)]
    assert generator.responses[late].tokens == other


def test_per_sequence_seeds_reproduce_sampling_alone(demo):
    model, processor = demo
    settings = [
        dict(temperature=1.0, seed=7),
        dict(temperature=0.8, top_p=0.9, seed=11),
        dict(temperature=1.2, top_k=40, min_p=0.05, seed=7, repetition_penalty=1.3),
    ]
    prompts = [{"prompt": "Hello", **s} for s in settings]
    batch = batch_generate(model, processor, prompts, max_tokens=12)
    for s, response in zip(settings, batch):
        assert response.tokens == alone(model, processor, {"prompt": "Hello"}, max_tokens=12, **s)[0]
    assert batch[0].tokens != batch[2].tokens


def test_bad_prompts_get_their_own_error(demo, media, tmp_path):
    model, processor = demo
    prompts = [
        "Fine",
        "",
        {"prompt": "Look", "images": [str(tmp_path / "missing.png")]},
        {"prompt": "Hot", "temperature": -1},
        {"prompt": "Long", "max_tokens": 10**6},
        "Also fine",
    ]
    batch = batch_generate(model, processor, prompts, max_tokens=5)
    assert [r.finish_reason == "error" for r in batch] == [False, True, True, True, True, False]
    assert "empty" in batch[1].error and "missing.png" in batch[2].error and "temperature" in batch[3].error
    assert "context" in batch[4].error
    assert batch[0].tokens == alone(model, processor, {"prompt": "Fine"}, max_tokens=5)[0]
    assert batch[5].tokens == alone(model, processor, {"prompt": "Also fine"}, max_tokens=5)[0]


def test_kv_memory_bound_queues_and_refuses(demo):
    model, processor = demo
    one = kv_bytes(model, processor("Hi there")["input_ids"].shape[1] + 1 + 8)  # + BOS
    generator = BatchGenerator(model, processor, max_batch=8, max_kv_bytes=one + one // 2)
    uids = [generator.submit("Hi there", max_tokens=8) for _ in range(2)]
    too_big = generator.submit("Hi there", max_tokens=500)
    generator.step()
    assert len(generator._active) == 1 and len(generator._queue) == 1  # the second waits for room
    while not generator.done:
        generator.step()
    assert generator.responses[uids[0]].tokens == generator.responses[uids[1]].tokens
    assert "max_kv_bytes" in generator.responses[too_big].error


def test_kv_bits_and_a_saved_prompt_cache_prefix(demo, tmp_path):
    model, processor = demo
    chat = [{"role": "user", "content": "Tell me a story."}]
    cache = PromptCache(model)
    list(stream_generate(model, processor, chat, max_tokens=4, prompt_cache=cache))
    cache.save(tmp_path / "prefix.safetensors")
    follow = chat + [{"role": "assistant", "content": "Once"}, {"role": "user", "content": "Go on."}]
    warm = PromptCache.load(tmp_path / "prefix.safetensors", model)
    prompts = [
        {"prompt": follow, "prompt_cache": warm},
        {"prompt": "Count to ten.", "kv_bits": 8},
        {"prompt": follow, "kv_bits": 8},
    ]
    batch = batch_generate(model, processor, prompts, max_tokens=20)
    assert 0 < batch[0].prefilled_tokens < batch[0].prompt_tokens
    assert batch[0].tokens == alone(model, processor, {"prompt": follow}, max_tokens=20)[0]
    for prompt, response in zip(prompts[1:], batch[1:]):
        assert response.tokens == alone(model, processor, {"prompt": prompt["prompt"]}, max_tokens=20, kv_bits=8)[0]


def _poison(generator, uid: int, after: int) -> None:
    """Make sequence `uid`'s sampler raise from its `after`-th call on (as a fault would)."""
    sequence = generator._active[uid]
    sample, calls = sequence.sampler, [0]

    def failing(logits):
        calls[0] += 1
        if calls[0] >= after:
            raise RuntimeError("poisoned")
        return sample(logits)

    sequence.sampler = failing


PROMPTS = ["The sea is", "Tell me a story", "Count to five"]


def test_a_sequence_that_fails_mid_decode_ends_alone(demo):
    model, processor = demo
    generator = BatchGenerator(model, processor, max_batch=4)
    uids = [generator.submit(p, max_tokens=12) for p in PROMPTS]
    generator.step()  # all three admitted and decoding
    _poison(generator, uids[1], after=3)
    events = []
    while not generator.done:
        events += generator.step()
    failed = generator.responses[uids[1]]
    assert failed.finish_reason == "error" and failed.fault and "RuntimeError" in failed.error
    assert [e.finish_reason for e in events if e.uid == uids[1]][-1] == "error"
    for uid, prompt in zip(uids, PROMPTS):
        if uid != uids[1]:
            assert generator.responses[uid].tokens == alone(model, processor, {"prompt": prompt}, max_tokens=12)[0]


def test_a_failing_batched_step_is_retried_row_by_row(demo, monkeypatch):
    """The batched forward fails after it wrote into the caches: every row is rolled back and
    stepped alone, and only the row that fails alone is dropped."""
    model, processor = demo
    generator = BatchGenerator(model, processor, max_batch=4)
    uids = [generator.submit(p, max_tokens=12) for p in PROMPTS]
    generator.step()
    poisoned = generator._active[uids[2]].prompt_cache.caches
    rows, alone_pass = type(model).rows, type(model).__call__

    def failing(run):  # the batched pass, or a row's pass alone, over the poisoned row's caches
        def call(self, tokens, *args, **kwargs):
            out = run(self, tokens, *args, **kwargs)
            caches = args[0] if args else kwargs.get("cache")
            hit = caches is poisoned or any(c is poisoned for c in caches or [])
            if hit and generator.responses[uids[2]].generation_tokens >= 4:
                raise RuntimeError("poisoned")
            return out

        return call

    monkeypatch.setattr(type(model), "rows", failing(rows))
    monkeypatch.setattr(type(model), "__call__", failing(alone_pass))
    while not generator.done:
        generator.step()
    monkeypatch.setattr(type(model), "rows", rows)
    monkeypatch.setattr(type(model), "__call__", alone_pass)
    assert generator.responses[uids[2]].finish_reason == "error"
    assert 4 <= generator.responses[uids[2]].generation_tokens < 12
    for uid, prompt in zip(uids[:2], PROMPTS[:2]):
        assert generator.responses[uid].tokens == alone(model, processor, {"prompt": prompt}, max_tokens=12)[0]


def test_prepared_inputs_join_like_submitted_prompts(demo):
    """add() takes prepare_inputs' arrays and a SamplingParams; a prompt past the context is refused
    at once, in one sentence, and the engine goes on with the others."""
    from mlx_gemma4u.generation.inputs import prepare_inputs
    from mlx_gemma4u.generation.params import SamplingParams

    model, processor = demo
    generator = BatchGenerator(model, processor)
    params = SamplingParams(max_tokens=8, seed=2**64 - 1, temperature=0.7)
    uid = generator.add(prepare_inputs(processor, "The sea is"), params)
    with pytest.raises(InputError, match="exceeds the model's context"):
        generator.add(prepare_inputs(processor, "The sea is"), params.replace(max_tokens=10**9))
    while not generator.done:
        generator.step()
    assert len(generator.responses[uid].tokens) == 8
    assert (
        generator.responses[uid].tokens
        == alone(model, processor, {"prompt": "The sea is"}, max_tokens=8, seed=2**64 - 1, temperature=0.7)[0]
    )
