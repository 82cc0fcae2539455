"""The text decoder against transformers 5.23.0 on random tiny checkpoints.

Bound: float32 logits may differ by 1e-4, relative to max|logit| / 5 where logits exceed 5 (the
final norm is scaled up 20x on softcapped configs so the softcap is non-linear, which scales float
noise up too). Measured: 3.0e-4 at max|logit| 28.8 ("full"), 7.9e-5 at 2.6 ("plain"), 1.1e-4 at
29.1 ("variant").
"""

import copy

import mlx.core as mx
import numpy as np
import pytest
import reference
import torch

from mlx_gemma4u.weights.loading import load_model

CHECKPOINTS = [n for n in reference.TEXT_CONFIGS] + [f"{n}-published" for n in reference.TEXT_CONFIGS]
WINDOW = reference.BASE_TEXT["sliding_window"]


def bound(ref: np.ndarray) -> float:
    return 1e-4 * max(1.0, float(np.abs(ref).max()) / 5)


def prompt(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, reference.V - 10, size=(batch, length))


@pytest.fixture(scope="module")
def loaded(hf_checkpoints):
    return {name: load_model(hf_checkpoints[name][1]) for name in CHECKPOINTS}


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_float32_logits(name, hf_checkpoints, loaded):
    ids = prompt(2, 3 * WINDOW + 5)  # longer than the sliding window, batch of two
    ref = reference.logits(hf_checkpoints[name][0], ids)
    ours = np.array(loaded[name](mx.array(ids, dtype=mx.int32)))
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= bound(ref)


@pytest.mark.parametrize("name", ["full", "plain"])
def test_bfloat16_logits(name, hf_checkpoints):
    """In bf16 a random model drifts far from its float32 self (transformers' own bf16 is 5.6 off at
    max|logit| 28 on "full"), so the bound is relative to that drift: our bf16 logits are no further
    from the float32 truth than 1.5x transformers' bf16, in max and in mean |Δ|.
    Measured, ours / transformers: "full" max 7.96 / 5.64, mean 0.59 / 0.47; "plain" max 0.30 / 0.51,
    mean 0.047 / 0.055."""
    torch_model, path = hf_checkpoints[name]
    ids = prompt(1, 2 * WINDOW + 3)
    truth = reference.logits(torch_model, ids)
    theirs = reference.logits(copy.deepcopy(torch_model).to(torch.bfloat16), ids) - truth
    out = load_model(path, dtype="bfloat16")(mx.array(ids, dtype=mx.int32))
    assert out.dtype == mx.bfloat16
    ours = np.array(out.astype(mx.float32)) - truth
    assert np.abs(ours).max() <= 1.5 * np.abs(theirs).max()
    assert np.abs(ours).mean() <= 1.5 * np.abs(theirs).mean()


@pytest.mark.parametrize("name", list(reference.TEXT_CONFIGS))
def test_greedy_tokens_with_cache_cross_the_window(name, hf_checkpoints, loaded):
    """40 greedy tokens decoded one at a time with our caches equal the argmax of transformers'
    full forward pass at every step (no early stop), well past the sliding window of 8."""
    torch_model = hf_checkpoints[name][0]
    model = loaded[name]
    ids = [int(i) for i in prompt(1, 12, seed=3)[0]]
    cache = model.make_cache()
    logits = model(mx.array([ids], dtype=mx.int32), cache=cache)
    ours, theirs = [], []
    for _ in range(40):
        token = int(mx.argmax(logits[0, -1]).item())
        expected = int(reference.logits(torch_model, [ids])[0, -1].argmax())
        ours.append(token)
        theirs.append(expected)
        ids.append(expected)
        logits = model(mx.array([[expected]], dtype=mx.int32), cache=cache)
    assert ours == theirs


def test_chunked_prefill_equals_one_pass(loaded):
    """Prefill in chunks of 5 through the caches gives the logits of one pass over the prompt."""
    model = loaded["full"]
    ids = mx.array(prompt(1, 4 * WINDOW + 1), dtype=mx.int32)
    whole = np.array(model(ids))
    cache = model.make_cache()
    parts = [np.array(model(ids[:, i : i + 5], cache=cache)) for i in range(0, ids.shape[1], 5)]
    assert np.abs(np.concatenate(parts, axis=1) - whole).max() < 1e-4


def test_sliding_cache_stays_within_window(loaded):
    model = loaded["full"]
    cache = model.make_cache()
    model(mx.array(prompt(1, 50), dtype=mx.int32), cache=cache)
    for _ in range(5):
        model(mx.array([[7]], dtype=mx.int32), cache=cache)
    sliding = [
        c
        for c, spec in zip(cache, [s for s in model.config.text.layers if s.kv_mode != "reuse"])
        if spec.layer_type == "sliding_attention"
    ]
    # the window plus as many tokens again, which a conversation may take back (cache.rewind)
    assert sliding and all(c.keys.shape[2] <= 2 * WINDOW for c in sliding)
    # Two layers reuse others' keys and values, so they own no cache.
    assert len(cache) == len(model.config.text.layers) - 2


def test_left_padded_batch_equals_transformers_generate_positions(hf_checkpoints, loaded):
    """A left-padded batch: the real tokens of each row get the logits transformers gives with the
    same attention mask and generate()'s positions (cumsum of the mask - 1)."""
    torch_model = hf_checkpoints["full"][0]
    ids = prompt(2, 2 * WINDOW + 4, seed=5)
    mask = np.ones_like(ids)
    mask[1, :6] = 0
    positions = np.clip(mask.cumsum(1) - 1, 0, None)
    ref = reference.logits(
        torch_model, ids, attention_mask=torch.from_numpy(mask), position_ids=torch.from_numpy(positions)
    )
    ours = np.array(loaded["full"](mx.array(ids, dtype=mx.int32), attention_mask=mx.array(mask)))
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() <= bound(ref[real])


def test_rewinding_a_wrapped_cache_equals_a_cold_run(loaded):
    """Prompt, 12 decoded tokens (the sliding buffers wrap), take back 6, continue with other
    tokens: the logits equal one pass over the resulting sequence."""
    from mlx_gemma4u.models.cache import can_rewind, rewind

    model = loaded["full"]
    ids = [int(i) for i in prompt(1, 3 * WINDOW, seed=9)[0]]
    cache = model.make_cache()
    model(mx.array([ids], dtype=mx.int32), cache=cache)
    for t in range(12):
        model(mx.array([[20 + t]], dtype=mx.int32), cache=cache)
    assert all(can_rewind(c, 6) for c in cache)
    assert not all(can_rewind(c, 2 * WINDOW) for c in cache)
    for c in cache:
        rewind(c, 6)
    tail = [40, 41, 42, 43, 44]
    warm = np.array(model(mx.array([tail], dtype=mx.int32), cache=cache))
    whole = ids + [20 + t for t in range(6)] + tail
    cold = np.array(model(mx.array([whole], dtype=mx.int32)))[:, -len(tail) :]
    assert np.abs(warm - cold).max() < 1e-4
    step = np.array(model(mx.array([[45]], dtype=mx.int32), cache=cache))
    cold = np.array(model(mx.array([whole + [45]], dtype=mx.int32)))[:, -1:]
    assert np.abs(step - cold).max() < 1e-4


@pytest.mark.parametrize("name", ["full", "plain"])
@pytest.mark.parametrize("keep", [1, 3])
def test_keeping_the_last_positions_equals_slicing_all_of_them(name, keep, loaded):
    """logits_to_keep cuts the queries inside the last layer that computes keys and values: after
    cached tokens, with a left-padded batch and a vision block that ends the chunk (its tokens see
    each other both ways), the kept logits and every cache equal a full pass sliced afterwards."""
    model = loaded[name]
    past = mx.array(prompt(2, WINDOW + 3, seed=3), dtype=mx.int32)
    ids = mx.array(prompt(2, 2 * WINDOW, seed=4), dtype=mx.int32)
    types = mx.array([[0] * (2 * WINDOW - 5) + [1] * 5] * 2)
    mask = mx.array(np.ones((2, 3 * WINDOW + 3), dtype=np.int32))
    mask[0, :2] = 0  # row 0 is left-padded
    runs = []
    for logits_to_keep in (keep, 0):
        cache = model.make_cache()
        model(past, cache=cache, attention_mask=mask[:, : WINDOW + 3])
        out = model(ids, cache=cache, attention_mask=mask, mm_token_type_ids=types, logits_to_keep=logits_to_keep)
        runs.append((np.array(out[:, -keep:]), [np.array(a) for c in cache for a in c.state]))
    (kept, kept_caches), (whole, whole_caches) = runs
    assert kept.shape[1] == keep
    assert np.abs(kept - whole).max() < 1e-5
    assert all(np.abs(a - b).max() < 1e-6 for a, b in zip(kept_caches, whole_caches))
