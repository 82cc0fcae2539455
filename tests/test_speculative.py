"""Speculative decoding with a Gemma 4 MTP assistant (draft.py, generate.speculative_step).

Checkpoints: a tiny multimodal target with no KV-shared layers (as the real 12B) whose post-norm
scales are shrunk to 0.45 so that it often repeats its last token, and three assistants whose
backbone_hidden_size matches it: random with the tied head, random with the centroid head, and a
"pass-through" one (pre_projection selects the target's hidden state, every layer adds nothing,
head tied to the target's embeddings), which drafts the target's last token again and is accepted
in about one draft in eight here: whole rounds, partial rounds and rejections all occur.
transformers runs with 5.24.0's kv_sharing_modes (draft_reference.kv_sharing_5_24).
"""

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx_lm.sample_utils import make_sampler
from transformers.generation import candidate_generator

import draft_reference as dr
import multimodal_inputs as mi
import reference
from mlx_gemma4u.draft import load_draft_model
from mlx_gemma4u.errors import ConfigError
from mlx_gemma4u.generate import DraftStats, PromptCache, generate_step, speculative_step
from mlx_gemma4u.loading import load_model

STEPS, K = 64, 4
TARGET = reference.TEXT_CONFIGS["plain"]


def passthrough(assistant, target) -> None:
    """Make `assistant` (hidden size = the target's) draft argmax(target head(target hidden state))."""
    D = assistant.config.backbone_hidden_size
    with torch.no_grad():
        assistant.pre_projection.weight.zero_()
        assistant.pre_projection.weight[:, D:] = torch.eye(D)
        assistant.post_projection.weight.copy_(torch.eye(D))
        assistant.model.norm.weight.fill_(1.0)
        assistant.model.embed_tokens.weight.copy_(target.model.language_model.embed_tokens.weight)
        for layer in assistant.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()


def repetitive_target(text: dict):
    """A transformers target whose post-norm scales are shrunk to 0.45, so it often repeats itself."""
    target = reference.build(text, seed=3)
    with torch.no_grad():
        for layer in target.model.language_model.layers:
            layer.post_attention_layernorm.weight.mul_(0.45)
            layer.post_feedforward_layernorm.weight.mul_(0.45)
    return target


@pytest.fixture(scope="module")
def torch_models():
    with dr.kv_sharing_5_24():
        target = repetitive_target(TARGET)
        drafters = {"tied": dr.build_assistant(TARGET, seed=5), "ordered": dr.build_assistant(TARGET, seed=6, ordered=True),
                    "passthrough": dr.build_assistant(TARGET, seed=7, hidden=reference.BASE_TEXT["hidden_size"])}
        passthrough(drafters["passthrough"], target)
    return target, drafters


@pytest.fixture(scope="module")
def models(torch_models, tmp_path_factory):
    target, drafters = torch_models
    root = tmp_path_factory.mktemp("speculative")
    model = load_model(reference.save(target, root / "target"))
    return model, {name: load_draft_model(dr.save(d, root / name)) for name, d in drafters.items()}


def text_prompt(n: int = 13, seed: int = 2) -> dict:
    return {"input_ids": mx.array(np.random.default_rng(seed).integers(3, reference.V - 20, size=(1, n)), dtype=mx.int32)}


def mlx_case(case: dict) -> dict:
    return {"input_ids": mx.array(case["input_ids"], dtype=mx.int32), "mm_token_type_ids": mx.array(case["mm_token_type_ids"]),
            **{k: mx.array(v) for k, v in case["media"].items()}}


def run(model, inputs, cache, drafter=None, k=K, max_tokens=STEPS, sampler=None, stats=None) -> list[int]:
    sampler = sampler or make_sampler(0.0)
    if drafter is None:
        return [t for t, _ in generate_step(model, inputs, cache, sampler, max_tokens=max_tokens, prefill_step_size=16)]
    steps = speculative_step(model, drafter, inputs, cache, sampler, max_tokens=max_tokens, prefill_step_size=16,
                             num_draft_tokens=k, stats=stats)
    return [t for t, _, _ in steps]


@pytest.mark.parametrize("head", ["tied", "ordered"])
def test_first_draft_steps_equal_transformers(head, torch_models, models):
    """Three draft steps after a 20-token prompt (past the window of 8), given transformers' own target
    outputs: the first step's logits and projected state within 1e-4 (measured at most 3e-5), the
    next two within 5e-4 (measured at most 2e-4, centroid head)."""
    target, drafters = torch_models
    model, ours = models
    ids = np.random.default_rng(1).integers(3, 400, size=(1, 20))
    L = ids.shape[1]
    expected = []
    with dr.kv_sharing_5_24(), torch.no_grad():
        out = target(input_ids=torch.from_numpy(ids), output_hidden_states=True, return_shared_kv_states=True)
        token, hidden = out.logits[0, -1].argmax()[None, None], out.hidden_states[-1][:, -1:]
        for _ in range(3):
            a = drafters[head](inputs_embeds=torch.cat([target.get_input_embeddings()(token), hidden], -1),
                               position_ids=torch.tensor([[L]]), attention_mask=torch.ones(1, L + 1, dtype=torch.long),
                               shared_kv_states=out.shared_kv_states)
            expected.append((a.logits.numpy(), a.last_hidden_state.numpy()))
            token, hidden = a.logits.argmax(-1), a.last_hidden_state
    cache = model.make_cache()
    logits, hidden = model(mx.array(ids, dtype=mx.int32), cache=cache, return_hidden=True)
    token, hidden = first = mx.argmax(logits[0, -1:], axis=-1).astype(mx.int32), hidden[:, -1:]
    step = ours[head].attend_to(model.shared_kv(cache), L)
    for i, (want_logits, want_hidden) in enumerate(expected):
        got_logits, hidden = ours[head](model.language_model.embed(token[None]), hidden, step)
        tolerance = 1e-4 if i == 0 else 5e-4  # later steps compound float32 rounding
        np.testing.assert_allclose(np.array(got_logits), want_logits, atol=tolerance, rtol=0)
        np.testing.assert_allclose(np.array(hidden), want_hidden, atol=tolerance, rtol=0)
        token = mx.argmax(got_logits[0], axis=-1)
    drafts = ours[head].draft(model, model.shared_kv(cache), *first, 3)
    assert drafts.tolist() == [int(np.argmax(e[0])) for e in expected]


@pytest.mark.parametrize("name", ["text", "one_image", "audio"])
def test_greedy_speculative_equals_plain(name, models, golden_dir):
    """64 tokens past the window, every kind of round (all accepted, some, none) exercised."""
    model, drafters = models
    inputs = text_prompt() if name == "text" else mlx_case(mi.build_case(golden_dir, name))
    stats = DraftStats()
    assert run(model, inputs, PromptCache(model), drafters["passthrough"], stats=stats) == run(model, inputs, PromptCache(model))
    assert {0, K} <= set(stats.rounds) and any(0 < n < K for n in stats.rounds), stats.rounds
    assert stats.accepted == sum(stats.rounds) and stats.drafted <= K * len(stats.rounds)


@pytest.mark.parametrize("drafter", ["tied", "ordered"])
def test_rejected_drafts_leave_output_unchanged(drafter, models):
    model, drafters = models
    assert run(model, text_prompt(), PromptCache(model), drafters[drafter], k=3) == run(model, text_prompt(), PromptCache(model))


def test_two_prompt_cache_turns(models):
    """A second turn reuses the first's cache (including what speculative rounds put there) and still
    matches plain decoding turn for turn."""
    model, drafters = models
    plain_cache, spec_cache = PromptCache(model), PromptCache(model)
    first = text_prompt()
    turns = [(run(model, first, plain_cache), run(model, first, spec_cache, drafters["passthrough"]))]
    assert turns[0][0] == turns[0][1]
    assert spec_cache.tokens == plain_cache.tokens
    follow = {"input_ids": mx.concatenate([first["input_ids"][0], mx.array(turns[0][0], dtype=mx.int32),
                                           text_prompt(5, seed=9)["input_ids"][0]])[None]}
    second = run(model, follow, spec_cache, drafters["passthrough"])
    assert spec_cache.reused > first["input_ids"].shape[1]
    assert second == run(model, follow, plain_cache)


def test_stopping_mid_round_keeps_cache_consistent(models):
    """A caller that stops after a drafted token leaves the caches holding exactly PromptCache.tokens."""
    model, drafters = models
    cache = PromptCache(model)
    steps = speculative_step(model, drafters["passthrough"], text_prompt(), cache, make_sampler(0.0),
                             max_tokens=STEPS, num_draft_tokens=K)
    for n, (_, _, from_draft) in enumerate(steps):
        if from_draft and n > 20:
            break
    steps.close()
    assert all(c.offset == len(cache.tokens) for c in cache.caches)


def test_accepted_counts_equal_transformers(torch_models, models, monkeypatch):
    """Constant K: transformers' generate(assistant_model=...) accepts as many drafts each round."""
    target, drafters = torch_models
    model, ours = models
    prompt = text_prompt()
    matches = []
    original = candidate_generator.SinglePositionMultiTokenCandidateGenerator.get_candidates

    def recording(self, input_ids, model_kwargs, model_outputs, is_first_iteration, n_last_matches, **kw):
        if not is_first_iteration and not self.is_main_model_prefill:
            matches.append(int(n_last_matches))
        return original(self, input_ids, model_kwargs, model_outputs, is_first_iteration, n_last_matches, **kw)

    monkeypatch.setattr(candidate_generator.SinglePositionMultiTokenCandidateGenerator, "get_candidates", recording)
    drafters["passthrough"].generation_config.num_assistant_tokens = K
    drafters["passthrough"].generation_config.num_assistant_tokens_schedule = "constant"
    ids = torch.from_numpy(np.array(prompt["input_ids"]).astype(np.int64))
    with dr.kv_sharing_5_24(), torch.no_grad():
        out = target.generate(input_ids=ids, assistant_model=drafters["passthrough"], max_new_tokens=40,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
    stats = DraftStats()
    tokens = run(model, prompt, PromptCache(model), ours["passthrough"], max_tokens=40, stats=stats)
    assert tokens == out[0, ids.shape[1]:].tolist()
    assert stats.rounds[:len(matches)] == matches and len(matches) >= len(stats.rounds) - 1
    assert any(0 < n < K for n in matches) and K in matches


def test_load_draft_model_refuses_a_target_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gemma4_unified", "text_config": {}}')
    with pytest.raises(ConfigError, match="not a Gemma 4 assistant"):
        load_draft_model(tmp_path)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_speculative_equals_plain_sampled_for_the_same_seed(seed, models):
    """Every emitted token is one draw of the plain loop's sampler on the target's logits for the same
    history, in the same order, so with the same seed the sampled text is the plain loop's token for
    token: the output distribution is the target's (a stronger check than a frequency test)."""
    model, drafters = models
    sampler = make_sampler(0.1)  # cool enough that the greedy drafter is often accepted
    mx.random.seed(seed)
    plain = run(model, text_prompt(), PromptCache(model), sampler=sampler, max_tokens=32)
    mx.random.seed(seed)
    stats = DraftStats()
    drafted = run(model, text_prompt(), PromptCache(model), drafters["passthrough"], sampler=sampler, max_tokens=32,
                  stats=stats)
    assert drafted == plain and stats.accepted > 0, stats.rounds
    assert plain != run(model, text_prompt(), PromptCache(model), max_tokens=32)  # it did sample: not the greedy text


def test_greedy_speculative_with_quantized_kv(tmp_path):
    """kv_bits=8 on a target whose heads are 32 wide (so its full-attention caches do quantize)."""
    wide = {**TARGET, "head_dim": 32, "global_head_dim": 32}
    with dr.kv_sharing_5_24():
        target = repetitive_target(wide)
        assistant = dr.build_assistant(wide, seed=7, hidden=reference.BASE_TEXT["hidden_size"])
        passthrough(assistant, target)
    model = load_model(reference.save(target, tmp_path / "target"))
    drafter = load_draft_model(dr.save(assistant, tmp_path / "assistant"))
    cache, stats = PromptCache(model, kv_bits=8), DraftStats()
    drafted = run(model, text_prompt(), cache, drafter, stats=stats)
    assert drafted == run(model, text_prompt(), PromptCache(model, kv_bits=8))
    assert stats.accepted > 0 and any(type(c).__name__ == "QuantizedKVCache" for c in cache.caches)


def test_heads_too_narrow_to_quantize_keep_their_cache(models):
    """kv_bits on a target with 16-wide heads (below MLX's smallest group): those caches stay float."""
    model, _ = models
    cache = PromptCache(model, kv_bits=8)
    assert run(model, text_prompt(), cache, max_tokens=8) == run(model, text_prompt(), PromptCache(model), max_tokens=8)
    assert not any(type(c).__name__ == "QuantizedKVCache" for c in cache.caches)
