"""Speculative decoding with a Gemma 4 MTP assistant (draft.py, speculative.py).

Checkpoints: a tiny multimodal target with no KV-shared layers (as the real 12B) whose post-norm
scales are shrunk to 0.45 so that it often repeats its last token, and three assistants whose
backbone_hidden_size matches it: random with the tied head, random with the centroid head, and a
"pass-through" one (pre_projection selects the target's hidden state, every layer adds nothing,
head tied to the target's embeddings), which drafts the target's last token again and is accepted
in about one draft in eight here: whole rounds, partial rounds and rejections all occur.
transformers runs with 5.24.0's kv_sharing_modes (draft_reference.kv_sharing_5_24).
"""

import json
import sys
from pathlib import Path

import draft_reference as dr
import mlx.core as mx
import multimodal_inputs as mi
import numpy as np
import pytest
import reference
import torch
from commands import cli
from mlx.utils import tree_flatten
from mlx_lm.sample_utils import make_sampler
from transformers.generation import candidate_generator

from mlx_gemma4u.cli.main import main
from mlx_gemma4u.errors import ConfigError, InputError
from mlx_gemma4u.generation.api import batch_generate, stream_generate, stream_inputs
from mlx_gemma4u.generation.params import SamplingParams
from mlx_gemma4u.generation.prompt_cache import PromptCache
from mlx_gemma4u.generation.speculative import DraftLength, DraftStats, draft_and_verify, settle, verify
from mlx_gemma4u.generation.steps import TokenSampler, prefill
from mlx_gemma4u.models.config import ModelConfig
from mlx_gemma4u.models.model import Model
from mlx_gemma4u.weights import demo
from mlx_gemma4u.weights.demo import ensure_demo_drafter
from mlx_gemma4u.weights.loading import load_draft_model, load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.speculative import ReplayDrafter, assistant_config, random_drafter  # noqa: E402

STEPS, K = 64, 4
TARGET = reference.TEXT_CONFIGS["plain"]


@pytest.fixture(scope="module")
def torch_models():
    with dr.kv_sharing_5_24():
        target = dr.repetitive_target(TARGET)
        drafters = {
            "tied": dr.build_assistant(TARGET, seed=5),
            "ordered": dr.build_assistant(TARGET, seed=6, ordered=True),
            "passthrough": dr.build_assistant(TARGET, seed=7, hidden=reference.BASE_TEXT["hidden_size"]),
        }
        dr.passthrough(drafters["passthrough"], target)
    return target, drafters


@pytest.fixture(scope="module")
def models(torch_models, tmp_path_factory):
    target, drafters = torch_models
    root = tmp_path_factory.mktemp("speculative")
    model = load_model(reference.save(target, root / "target"))
    return model, {name: load_draft_model(dr.save(d, root / name)) for name, d in drafters.items()}


def text_prompt(n: int = 13, seed: int = 2) -> dict:
    return {
        "input_ids": mx.array(np.random.default_rng(seed).integers(3, reference.V - 20, size=(1, n)), dtype=mx.int32)
    }


def mlx_case(case: dict) -> dict:
    return {
        "input_ids": mx.array(case["input_ids"], dtype=mx.int32),
        "mm_token_type_ids": mx.array(case["mm_token_type_ids"]),
        **{k: mx.array(v) for k, v in case["media"].items()},
    }


def run(model, inputs, cache, drafter=None, k=K, max_tokens=STEPS, stats=None, **sampling) -> list[int]:
    """The reply's token ids (a one-row run of the engine, no tokenizer: only max_tokens stops it);
    with a drafter, its drafting goes into `stats`."""
    params = SamplingParams(max_tokens=max_tokens, **sampling)
    responses = list(stream_inputs(model, None, inputs, params, cache, 16, drafter, k if drafter else None))
    if stats is not None:
        vars(stats).update(vars(responses[-1].draft))
    return [r.token for r in responses]


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
            a = drafters[head](
                inputs_embeds=torch.cat([target.get_input_embeddings()(token), hidden], -1),
                position_ids=torch.tensor([[L]]),
                attention_mask=torch.ones(1, L + 1, dtype=torch.long),
                shared_kv_states=out.shared_kv_states,
            )
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
    drafts = ours[head].draft(model, [model.shared_kv(cache)], *first, 3)
    assert drafts.tolist() == [[int(np.argmax(e[0])) for e in expected]]


@pytest.mark.parametrize("name", ["text", "one_image", "audio"])
def test_greedy_speculative_equals_plain(name, models, golden_dir):
    """64 tokens past the window, every kind of round (all accepted, some, none) exercised."""
    model, drafters = models
    inputs = text_prompt() if name == "text" else mlx_case(mi.build_case(golden_dir, name))
    stats = DraftStats()
    assert run(model, inputs, PromptCache(model), drafters["passthrough"], stats=stats) == run(
        model, inputs, PromptCache(model)
    )
    assert {0, K} <= set(stats.rounds) and any(0 < n < K for n in stats.rounds), stats.rounds
    assert stats.accepted == sum(stats.rounds) and stats.drafted <= K * len(stats.rounds)


@pytest.mark.parametrize("drafter", ["tied", "ordered"])
def test_rejected_drafts_leave_output_unchanged(drafter, models):
    model, drafters = models
    assert run(model, text_prompt(), PromptCache(model), drafters[drafter], k=3) == run(
        model, text_prompt(), PromptCache(model)
    )


def test_two_prompt_cache_turns(models):
    """A second turn reuses the first's cache (including what speculative rounds put there) and still
    matches plain decoding turn for turn."""
    model, drafters = models
    plain_cache, spec_cache = PromptCache(model), PromptCache(model)
    first = text_prompt()
    turns = [(run(model, first, plain_cache), run(model, first, spec_cache, drafters["passthrough"]))]
    assert turns[0][0] == turns[0][1]
    assert spec_cache.tokens == plain_cache.tokens
    follow = {
        "input_ids": mx.concatenate(
            [first["input_ids"][0], mx.array(turns[0][0], dtype=mx.int32), text_prompt(5, seed=9)["input_ids"][0]]
        )[None]
    }
    second = run(model, follow, spec_cache, drafters["passthrough"])
    assert spec_cache.reused > first["input_ids"].shape[1]
    assert second == run(model, follow, plain_cache)


def test_stopping_mid_round_keeps_cache_consistent(models):
    """A caller that stops after a drafted token (the chat's Ctrl-C) leaves the caches holding exactly
    PromptCache.tokens, and the next turn on them decodes as a cold start does."""
    model, drafters = models
    cache = PromptCache(model)
    steps = stream_inputs(
        model,
        None,
        text_prompt(),
        SamplingParams(max_tokens=STEPS),
        cache,
        draft_model=drafters["passthrough"],
        num_draft_tokens=K,
    )
    for n, response in enumerate(steps):
        if response.from_draft and n > 20:
            break
    steps.close()
    assert all(c.offset == len(cache.tokens) for c in cache.caches)
    follow = {"input_ids": mx.array([cache.tokens + text_prompt(5, seed=9)["input_ids"][0].tolist()], dtype=mx.int32)}
    assert run(model, follow, cache, drafters["passthrough"]) == run(model, follow, PromptCache(model))
    assert cache.reused > 20


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
        out = target.generate(
            input_ids=ids,
            assistant_model=drafters["passthrough"],
            max_new_tokens=40,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    stats = DraftStats()
    tokens = run(model, prompt, PromptCache(model), ours["passthrough"], max_tokens=40, stats=stats)
    assert tokens == out[0, ids.shape[1] :].tolist()
    assert stats.rounds[: len(matches)] == matches and len(matches) >= len(stats.rounds) - 1
    assert any(0 < n < K for n in matches) and K in matches


def test_load_draft_model_refuses_a_target_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gemma4_unified", "text_config": {}}')
    with pytest.raises(ConfigError, match="not a Gemma 4 assistant"):
        load_draft_model(tmp_path)


@pytest.mark.parametrize("seed, k", [(0, K), (1, K), (2, K), (3, None)])
def test_sampled_speculative_equals_plain_sampled_for_the_same_seed(seed, k, models):
    """Every emitted token is one draw of the plain loop's sampler on the target's logits for the same
    history, in the same order, so with the same seed the sampled text is the plain loop's token for
    token, with a fixed K and with adaptive K (plain stretches included)."""
    model, drafters = models
    sampling = {"temperature": 0.1, "seed": seed}  # cool enough that the greedy drafter is often accepted
    plain = run(model, text_prompt(), PromptCache(model), max_tokens=32, **sampling)
    stats = DraftStats()
    drafted = run(
        model, text_prompt(), PromptCache(model), drafters["passthrough"], k=k, max_tokens=32, stats=stats, **sampling
    )
    assert drafted == plain and (stats.accepted > 0 if k else stats.plain > 0), stats.rounds
    assert plain != run(model, text_prompt(), PromptCache(model), max_tokens=32)  # it did sample: not the greedy text


def test_greedy_speculative_with_quantized_kv(tmp_path):
    """kv_bits=8 on a target whose heads are 32 wide (so its full-attention caches do quantize)."""
    wide = {**TARGET, "head_dim": 32, "global_head_dim": 32}
    with dr.kv_sharing_5_24():
        target = dr.repetitive_target(wide)
        assistant = dr.build_assistant(wide, seed=7, hidden=reference.BASE_TEXT["hidden_size"])
        dr.passthrough(assistant, target)
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


def simulate(pass_cost, draft_cost: float, acceptance: float, tokens: int = 2000, seed: int = 0) -> list[int]:
    """DraftLength's choices over a reply of about `tokens` tokens with synthetic costs (seconds of a
    pass over n positions; a drafter step in plain steps) and drafts accepted with `acceptance`:
    one K per round, 0 for each plain stretch."""
    length, rng, ks, done = DraftLength(draft_cost=draft_cost), np.random.default_rng(seed), [], 0
    while done < tokens:
        k = length.next()
        ks.append(k)
        if k == 0:
            length.decoded(length.stretch, length.stretch * pass_cost(1))
            done += length.stretch
            continue
        accepted = int(np.argmin(np.append(rng.random(k) < acceptance, False)))  # leading successes
        length.drafted(k, accepted, k * draft_cost * pass_cost(1), pass_cost(k + 1))
        done += accepted + 1
    return ks


def test_adaptive_k_drafts_long_where_verifying_is_free():
    """A Mac-like target (a pass over n positions costs one step) and a drafter a twentieth of it."""
    ks = simulate(lambda n: 1.0, 0.05, 0.9)
    assert ks[0] == 0 and ks[-20:] == [DraftLength.MAX_K] * 20


def test_adaptive_k_decodes_plainly_where_drafting_does_not_pay():
    """Never-accepted drafts on a flat pass, and well-accepted ones on a CPU-like pass that grows with
    n: plain stretches that double to the cap, with a one-draft probe between them."""
    for pass_cost, acceptance in ((lambda n: 1.0, 0.0), (lambda n: float(n), 0.8)):
        ks = simulate(pass_cost, 0.3, acceptance)
        assert ks.count(0) > 5 and set(ks[3:]) <= {0, 1} and ks.count(1) <= ks.count(0), ks
    length = DraftLength(draft_cost=0.3)
    for _ in range(12):
        if length.next() == 0:
            length.decoded(length.stretch, float(length.stretch))
        else:
            length.drafted(1, 0, 0.3, 1.0)
    assert length.stretch == DraftLength.MAX_STRETCH


def test_adaptive_k_never_drafts_with_a_drafter_slower_than_a_step():
    """Even all-accepted drafts cannot pay when a draft step costs more than a target step: not even a probe."""
    assert set(simulate(lambda n: 1.0, 1.5, 1.0)) == {0}


def test_pass_cost_reads_unmeasured_lengths_off_the_line():
    length = DraftLength()
    length.passes = {1: 1.0, 3: 2.0, 5: 3.0}
    assert length.pass_cost(9) == pytest.approx(5.0) and length.pass_cost(3) == 2.0


class Clocked(DraftLength):
    """Adaptive K whose measurements are replaced by synthetic costs, so its choices are reproducible."""

    def __init__(self, pass_cost, draft_cost: float):
        super().__init__(draft_cost=draft_cost)
        self.costs = pass_cost

    def drafted(self, k, accepted, draft_seconds, pass_seconds):
        super().drafted(k, accepted, k * self.draft_cost * self.costs(1), self.costs(k + 1))

    def decoded(self, n, seconds):
        super().decoded(n, n * self.costs(1))


@pytest.mark.parametrize("acceptance", [0.0, 0.8, 1.0])
def test_adaptive_greedy_speculative_equals_plain(acceptance, models):
    """The replay drafter (benchmarks/speculative.py) proposes the plain greedy tokens, corrupted with
    probability 1 - acceptance: on a Mac-like cost model K rises to the cap when every draft is
    right and falls to plain stretches when none is, and the output is plain greedy's throughout."""
    model, drafters = models
    plain = run(model, text_prompt(), PromptCache(model))
    record = text_prompt()["input_ids"][0].tolist() + plain
    stats = DraftStats()
    drafter = ReplayDrafter(drafters["passthrough"], record, acceptance)
    assert run(model, text_prompt(), PromptCache(model), drafter, k=Clocked(lambda n: 1.0, 0.05), stats=stats) == plain
    if acceptance == 1.0:
        assert stats.accepted == stats.drafted and DraftLength.MAX_K in stats.ks
    if acceptance == 0.0:
        assert stats.accepted == 0 and stats.plain >= STEPS * 3 // 4, stats


def test_stream_generate_drafts_adaptively_by_default(models, processor):
    """stream_generate(draft_model=...): the same tokens as without, each response saying whether its
    token was drafted, with the reply's drafting statistics."""
    model, drafters = models
    prompt = text_prompt()["input_ids"][0].tolist()
    plain = [r.token for r in stream_generate(model, processor, prompt, max_tokens=STEPS)]
    responses = list(stream_generate(model, processor, prompt, max_tokens=STEPS, draft_model=drafters["passthrough"]))
    assert [r.token for r in responses] == plain
    stats = responses[-1].draft
    assert sum(r.from_draft for r in responses) == stats.accepted
    assert stats.plain + stats.accepted + len(stats.rounds) + 1 == len(plain)


def chi_square_bound(dof: int, z: float = 3.09) -> float:
    """The chi-square statistic that `dof` degrees of freedom exceed with probability 1e-3 (z = 3.09),
    by Wilson and Hilferty's cube-root normal approximation."""
    return dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3


def chi_square(counts: np.ndarray, p: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom; tokens expected fewer than 5 times share one bin."""
    expected = p * counts.sum()
    big = expected >= 5
    observed, wanted = np.append(counts[big], counts[~big].sum()), np.append(expected[big], expected[~big].sum())
    return float(((observed - wanted) ** 2 / wanted).sum()), len(observed) - 1


def test_speculative_sampling_preserves_the_target_distribution(models):
    """2,000 seeded rounds of one draft from the same state (temperature 0.2; the replay drafter proposes
    the target's argmax, which has 39% probability; the round's verify pass, the same for every seed,
    runs once and each seed draws from it): the first token's frequencies match the
    target's softmax, and so do the second token's given the draft was accepted (about 770 rounds),
    by a chi-square test at p = 1e-3 (measured 9.6 on 15 degrees of freedom, bound 37.8; 9.6 on 10,
    bound 29.8); the same counts reject the softmax at temperature 0.25."""
    model, drafters = models
    temperature, draws = 0.2, 2000
    inputs = text_prompt()
    prompt_cache = PromptCache(model)
    logits, hidden = prefill(model, inputs, prompt_cache, return_hidden=True)
    token, n = int(mx.argmax(logits).item()), len(prompt_cache.tokens)
    ids = inputs["input_ids"][0].tolist() + [token]
    target = model(mx.array([ids]))[0, -1].astype(mx.float32)
    draft = int(mx.argmax(target).item())
    drafter = ReplayDrafter(drafters["passthrough"], ids + [draft], acceptance=1.0)  # always proposes `draft`
    after = model(mx.array([ids + [draft]]))[0, -1].astype(mx.float32)
    rounds = []
    for _ in range(2):  # the same state twice: the round's verify pass does not change between seeds
        prompt_cache.keep(n)
        rounds.append(
            draft_and_verify(model, drafter, [prompt_cache.caches], mx.array([token], dtype=mx.int32), hidden, 1)
        )
        settle(prompt_cache, token, rounds[-1][0][0], 0)
    (proposed, verify_logits, *_), (again, again_logits, *_) = rounds
    assert proposed == again == [[draft]] and mx.array_equal(verify_logits, again_logits)
    firsts, seconds = np.zeros(reference.V), np.zeros(reference.V)
    for seed in range(draws):
        sample = TokenSampler(make_sampler(temperature), None, inputs["input_ids"][0], seed=seed)
        out = verify(sample, verify_logits, proposed[0])
        firsts[out[0][0]] += 1
        if len(out) == 2:
            seconds[out[1][0]] += 1
    softmax = lambda x, t: np.array(mx.softmax(x / t).tolist())  # noqa: E731
    for counts, scores in ((firsts, target), (seconds, after)):
        statistic, dof = chi_square(counts, softmax(scores, temperature))
        assert statistic < chi_square_bound(dof), (statistic, dof)
    statistic, dof = chi_square(firsts, softmax(target, 0.25))
    assert statistic > chi_square_bound(dof)
    assert seconds.sum() == firsts[draft] > draws / 4


def test_cli_generate_with_a_draft_model(demo_home, tmp_path):
    """`generate --demo --draft-model FOLDER` (a random assistant for the demo, saved as a checkpoint
    folder): the same reply as without, and the summary line reports the drafting."""
    target = load_model(demo_home / "demo-v1")
    folder = tmp_path / "assistant"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(assistant_config(target, hidden=32, intermediate=64)))
    drafter = random_drafter(target, mx.float32, hidden=32, intermediate=64)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(drafter.parameters())))
    args = ("generate", "--demo", "--prompt", "Hello", "--max-tokens", "12")
    plain, drafted = cli(*args, home=demo_home), cli(*args, "--draft-model", str(folder), home=demo_home)
    assert plain.returncode == drafted.returncode == 0, drafted.stderr
    assert drafted.stdout == plain.stdout and "drafted" in drafted.stderr and "drafted" not in plain.stderr


@pytest.mark.parametrize("k", [K, None])
def test_batched_speculative_rows_keep_their_own_accepted_lengths(k, models, processor):
    """Six prompts of different lengths decoded together with the passthrough drafter (fixed K, and
    adaptive): each row's tokens are its plain greedy tokens alone, rows accept different numbers of
    drafts in the same round (no clamping to the batch's shortest), and a row that stops early
    (max_tokens 9, mid-round) leaves its PromptCache holding exactly what it handed out."""
    model, drafters = models
    bos = processor.tokenizer.bos_token_id  # batch_generate, as stream_generate, starts every prompt with it
    prompts = [
        [bos, *text_prompt(n, seed=s)["input_ids"][0].tolist()] for n, s in ((13, 2), (5, 3), (21, 4), (9, 5), (16, 6))
    ]
    early = PromptCache(model)
    requests = [*prompts, {"prompt": prompts[0], "max_tokens": 9, "prompt_cache": early}]
    responses = batch_generate(
        model, processor, requests, max_tokens=40, draft_model=drafters["passthrough"], num_draft_tokens=k
    )
    for prompt, response in zip(prompts, responses):
        assert response.tokens == run(
            model, {"input_ids": mx.array([prompt], dtype=mx.int32)}, PromptCache(model), max_tokens=40
        )
    assert responses[5].tokens == responses[0].tokens[:9]
    kept = early.tokens[len(prompts[0]) :]  # the handed-out tokens in the caches (the last one may not be)
    assert all(c.offset == len(early.tokens) for c in early.caches) and kept == responses[5].tokens[: len(kept)]
    assert len(kept) >= 8
    stats = [r.draft for r in responses[:5]]
    assert sum(s.accepted for s in stats) > 0
    if k:
        rounds = list(zip(*(s.rounds for s in stats)))  # the rounds all rows took part in
        assert any(len(set(r)) > 1 for r in rounds), rounds


def test_the_demo_drafter_is_written_once_beside_the_demo(demo_pair, demo_home):
    folder = demo_home / "demo-drafter-v1"
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_drafter(folder) == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((folder / "config.json").read_text())["model_type"] == "gemma4_unified_assistant"
    assert "nonsense" in (folder / "README.md").read_text()
    assert sorted(p.name for p in demo_home.iterdir()) == ["demo-drafter-v1", "demo-v1"]  # no staging left


def test_the_demo_drafter_is_an_assistant_checkpoint_transformers_runs_alike(demo_pair, demo_home):
    """transformers loads the demo drafter as Gemma4UnifiedAssistantForCausalLM with no missing or
    unexpected weight, and its first draft step on the demo target's state is ours (float32)."""
    from transformers import Gemma4UnifiedAssistantForCausalLM, Gemma4UnifiedForConditionalGeneration

    ids = [2, 105, 2364, 107, 9259, 106, 107, 105, 4368, 107]
    with dr.kv_sharing_5_24(), torch.no_grad():
        target = Gemma4UnifiedForConditionalGeneration.from_pretrained(demo_home / "demo-v1", dtype=torch.float32)
        assistant, info = Gemma4UnifiedAssistantForCausalLM.from_pretrained(
            demo_home / "demo-drafter-v1", dtype=torch.float32, output_loading_info=True
        )
        out = target.eval()(input_ids=torch.tensor([ids]), output_hidden_states=True, return_shared_kv_states=True)
        token, hidden = out.logits[0, -1].argmax()[None, None], out.hidden_states[-1][:, -1:]
        want = assistant.eval()(
            inputs_embeds=torch.cat([target.get_input_embeddings()(token), hidden], -1),
            position_ids=torch.tensor([[len(ids)]]),
            shared_kv_states=out.shared_kv_states,
            attention_mask=torch.ones(1, len(ids) + 1, dtype=torch.long),
        ).logits.numpy()
    assert not any(info.values()), info
    model = load_model(demo_home / "demo-v1", dtype="float32")
    drafter = load_draft_model(demo_home / "demo-drafter-v1", dtype="float32")
    cache = model.make_cache()
    logits, ours_hidden = model(mx.array([ids], dtype=mx.int32), cache=cache, return_hidden=True)
    first = mx.argmax(logits[0, -1:], axis=-1).astype(mx.int32)
    got, _ = drafter(
        model.language_model.embed(first[None]),
        ours_hidden[:, -1:],
        drafter.attend_to(model.shared_kv(cache), len(ids)),
    )
    assert first.item() == token.item()
    np.testing.assert_allclose(np.array(got), want, atol=1e-4 * max(1.0, np.abs(want).max()), rtol=0)


@pytest.mark.parametrize("k", [None, 3, 0])
def test_greedy_with_the_demo_drafter_equals_plain(k, demo_pair):
    """The demo drafter on the demo (adaptive K, a fixed K, and a fixed K of 0: no drafts, every
    step a plain one): the reply is plain greedy's, token for token."""
    (model, processor), drafter = demo_pair
    plain = [r.token for r in stream_generate(model, processor, "Hello", max_tokens=24)]
    responses = list(stream_generate(model, processor, "Hello", max_tokens=24, draft_model=drafter, num_draft_tokens=k))
    assert [r.token for r in responses] == plain
    stats = responses[-1].draft
    assert (stats.drafted == 0 and stats.plain == len(plain) - 1) if k == 0 else stats.drafted > 0


def test_a_fixed_k_of_0_decodes_in_the_longest_plain_stretches():
    assert DraftLength(fixed=0).next() == 0 and DraftLength(fixed=0).stretch == DraftLength.MAX_STRETCH


def test_a_drafter_for_another_model_is_refused_in_one_line(demo_pair, demo_home, monkeypatch, capsys):
    """`--draft-model demo` with a model it was not made for: one sentence, before any prompt, instead
    of a shape error deep in a matmul."""
    _, drafter = demo_pair
    wider, other_heads = (
        Model(ModelConfig.from_dict({**demo.CONFIG, "text_config": {**demo.CONFIG["text_config"], **change}}))
        for change in ({"hidden_size": 128}, {"head_dim": 32})
    )
    with pytest.raises(InputError, match="made for a hidden size of 64, the model's is 128"):
        drafter.check_target(wider)
    with pytest.raises(InputError, match="sliding_attention queries .4 heads of 16. cannot attend"):
        drafter.check_target(other_heads)
    monkeypatch.setenv("MLX_GEMMA4U_HOME", str(demo_home))
    monkeypatch.setattr("mlx_gemma4u.cli.flags.load_from_args", lambda args, adapter_path=None: (wider, None))
    assert main(["generate", "--demo", "--prompt", "Hi", "--draft-model", "demo"]) == 1
    assert capsys.readouterr().err.startswith("error: This drafter does not fit the model")


def test_cli_generate_with_the_demo_drafter(demo_home, capsys):
    """`--draft-model demo` needs no download and changes nothing in the reply; `--num-draft-tokens 0`
    loads the drafter and drafts nothing; the help says the demo drafter is random."""
    args = ("generate", "--demo", "--prompt", "Hello", "--max-tokens", "12")
    plain, drafted = cli(*args, home=demo_home), cli(*args, "--draft-model", "demo", home=demo_home)
    none = cli(*args, "--draft-model", "demo", "--num-draft-tokens", "0", home=demo_home)
    assert plain.returncode == drafted.returncode == none.returncode == 0, (drafted.stderr, none.stderr)
    assert plain.stdout == drafted.stdout == none.stdout and "drafted" in drafted.stderr
    assert "drafted 0, accepted 0 (0%), K 0, 11 undrafted" in none.stderr
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "'demo': the built-in demo drafter for --demo (random weights: nonsense drafts" in help_text
    assert "0 drafts none (every step a plain one)" in help_text


def test_an_adapted_target_still_gets_exactly_its_own_greedy_reply(torch_models, models, tmp_path):
    """A drafter keeps working on a target with LoRA adapters: it reads the adapted target's hidden
    states and keys, and verification keeps the reply exactly the adapted target's own. The drafter
    was trained for the base, so acceptance falls as far as the adapters move the target's choices
    (docs/training.md); here the pass-through drafter follows the adapted head and keeps drafting."""
    from mlx.utils import tree_unflatten

    from mlx_gemma4u.models import lora

    _, drafters = models
    adapted = lora.apply(
        load_model(reference.save(torch_models[0], tmp_path / "target")), lora.AdapterConfig(num_layers=-1)
    )
    rng = np.random.default_rng(0)
    trainable = tree_flatten(adapted.trainable_parameters())
    adapted.update(tree_unflatten([(k, mx.array(rng.normal(0, 0.05, v.shape), dtype=v.dtype)) for k, v in trainable]))
    adapted.eval()
    base_stats, adapted_stats = DraftStats(), DraftStats()
    base_reply = run(models[0], text_prompt(), PromptCache(models[0]), drafters["passthrough"], stats=base_stats)
    plain = run(adapted, text_prompt(), PromptCache(adapted))
    drafted = run(adapted, text_prompt(), PromptCache(adapted), drafters["passthrough"], stats=adapted_stats)
    print(
        f"accepted per draft: base {base_stats.accepted / base_stats.drafted:.2f}, "
        f"adapted {adapted_stats.accepted / adapted_stats.drafted:.2f}"
    )
    assert drafted == plain != base_reply
    assert adapted_stats.accepted > 0
