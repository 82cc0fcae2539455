"""Speculative decoding with an MTP drafter (draft.DraftModel): several tokens per target pass, same output.

    last token + the hidden state that predicted it --drafter, K steps--> K drafts
    --target, one pass over the last token and the K drafts (K + 1 positions)--> K + 1 logits
    --the plain loop's sampler, position by position--> the accepted drafts + the target's own token
    --every cache rewound to what was accepted

On a Mac a decode step reads every weight once, so a pass over K + 1 positions costs about what a
pass over one does, and each accepted draft is a token for free. Where the pass grows with K (this
CPU) or the drafter is rarely right, drafting loses: DraftLength measures both as it goes and picks
K each round, down to K = 0, where the loop decodes plainly (generate.decode, pipelined) and only
now and then probes whether drafting pays again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_gemma4u.models.cache import PromptCache
from mlx_gemma4u.generation.generate import TokenSampler, decode, prefill


@dataclass
class DraftStats:
    """A reply's speculative decoding: tokens drafted and accepted, per round and in all, and the K used."""

    drafted: int = 0
    accepted: int = 0
    rounds: list[int] = field(default_factory=list)  # accepted drafts per round
    ks: list[int] = field(default_factory=list)  # K per round
    plain: int = 0  # tokens decoded without drafting (K = 0)
    k: int = 0  # the draft length chosen last (0: decoding plainly)

    @property
    def rate(self) -> float:
        """Accepted / drafted (0 before anything was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    def add(self, k: int, accepted: int) -> None:
        self.k, self.drafted, self.accepted = k, self.drafted + k, self.accepted + accepted
        self.rounds.append(accepted)
        self.ks.append(k)

    def add_plain(self, n: int) -> None:
        self.k, self.plain = 0, self.plain + n


class DraftLength:
    """The K of the next round: `fixed`, or (None) the K with the most expected tokens per second.

    Model: a draft is accepted with probability a once the ones before it were, so a round of K
    yields (1 - a^(K+1)) / (1 - a) tokens for K drafter steps plus one target pass over K + 1
    positions, against one token per plain step. a is estimated from the recent rounds (counts
    decayed by DECAY per round, Jeffreys' prior); a pass over n positions costs what was measured
    for n, else what the straight line through the plain step and the measured n says (flat before
    any); a drafter step costs what was measured, else `draft_cost` plain steps (decoding reads the
    weights once per step, so the weights' size ratio is a fair first guess). The reply starts with
    FIRST_PLAIN plain tokens, to time the plain step. When K = 0 wins, the loop decodes `stretch`
    tokens plainly, then probes with one round of K = 1, if drafting could pay at all (were every
    draft accepted); the stretch doubles (to MAX_STRETCH) while drafting keeps losing. A fixed K of 0
    never drafts: every stretch is MAX_STRETCH long, so the plain decode loop is rarely restarted.
    """

    MAX_K, FIRST_PLAIN, MIN_STRETCH, MAX_STRETCH, DECAY = 8, 4, 16, 128, 0.95

    def __init__(self, fixed: int | None = None, draft_cost: float = 0.25):
        self.fixed, self.draft_cost = fixed, draft_cost
        self.hits = self.trials = 0.0  # decayed counts: drafts accepted / drafts judged
        self.draft_step: float | None = None  # measured seconds per drafter step
        self.passes: dict[int, float] = {}  # positions -> seconds per target pass (1: a plain step)
        self.stretch = self.MAX_STRETCH if fixed == 0 else self.FIRST_PLAIN
        self.probe = False  # a plain stretch just ended: try drafting once more

    @classmethod
    def for_models(cls, model, drafter, fixed: int | None = None) -> "DraftLength":
        """K for `drafter` on `model`: `fixed`, or adaptive with a drafter step first guessed at the
        drafter's share of the weights a decode step reads."""
        return cls(fixed, _weight_bytes(drafter) / _weight_bytes(model.language_model))

    def next(self) -> int:
        """K for the next round; 0: decode the next `stretch` tokens plainly."""
        if self.fixed is not None:
            return self.fixed
        if 1 not in self.passes:
            return 0
        if self.probe:
            self.probe = False
            if max(self.speed(k, acceptance=1.0) for k in range(1, self.MAX_K + 1)) > self.speed(0):
                return 1
        k = max(range(self.MAX_K + 1), key=self.speed)
        self.stretch = self.MIN_STRETCH if k else min(2 * self.stretch, self.MAX_STRETCH)
        return k

    @property
    def acceptance(self) -> float:
        """The estimated chance that a draft is accepted, given the drafts before it were."""
        return (self.hits + 0.5) / (self.trials + 1)

    def speed(self, k: int, acceptance: float | None = None) -> float:
        """Expected tokens per second of a round of k (0: of plain decoding)."""
        if k == 0:
            return 1 / self.passes[1]
        a = self.acceptance if acceptance is None else acceptance
        step = self.draft_step if self.draft_step is not None else self.draft_cost * self.passes[1]
        return sum(a ** i for i in range(k + 1)) / (k * step + self.pass_cost(k + 1))

    def pass_cost(self, n: int) -> float:
        """Seconds of one target pass over n positions: measured, or read off the fitted line."""
        if n in self.passes:
            return self.passes[n]
        plain, others = self.passes[1], [(m, t) for m, t in self.passes.items() if m > 1]
        slope = sum((m - 1) * (t - plain) for m, t in others) / max(sum((m - 1) ** 2 for m, _ in others), 1)
        return plain + max(slope, 0.0) * (n - 1)

    def drafted(self, k: int, accepted: int, draft_seconds: float, pass_seconds: float) -> None:
        """A round of k drafts: `accepted` of them, the drafter's and the target's time."""
        self.hits = self.DECAY * self.hits + accepted
        self.trials = self.DECAY * self.trials + accepted + (accepted < k)
        self.draft_step = _blend(self.draft_step, draft_seconds / k)
        self.passes[k + 1] = _blend(self.passes.get(k + 1), pass_seconds)

    def decoded(self, n: int, seconds: float) -> None:
        """A plain stretch: n tokens in `seconds`."""
        self.passes[1] = _blend(self.passes.get(1), seconds / n)
        self.probe = True


def _blend(old: float | None, new: float, weight: float = 0.3) -> float:
    return new if old is None else (1 - weight) * old + weight * new


def speculative_step(
    model,
    drafter,
    inputs: dict,
    prompt_cache: PromptCache,
    sampler: Callable,
    logits_processors: list | None = None,
    max_tokens: int = 256,
    prefill_step_size: int = 512,
    draft_length: DraftLength | int | None = None,
    stats: DraftStats | None = None,
) -> Iterator[tuple[int, mx.array, bool]]:
    """generate.generate_step with a drafter: yield (token, logprobs, from_draft).

    Each round drafts k tokens after the last one, runs the target once over the last token and the
    k drafts (k + 1 positions), then draws the target's own token at each position in turn with the
    plain loop's TokenSampler: a draft is accepted while it equals that token; the first that differs
    (or the one after all k) is the target's. Every emitted token is one sampler call on the target's
    logits for the same history, so the output follows the target's distribution: greedy, exactly
    the plain loop's tokens; sampled, speculative sampling's rule for a deterministic drafter
    (accept with probability p(draft), else draw from p without the draft). The caches are then
    rewound to the accepted length, so they hold what PromptCache.tokens says, even if the caller
    stops in the middle of a round. draft_length: how K is chosen, or a fixed K (None: adaptive,
    DraftLength.for_models).
    """
    stats = stats if stats is not None else DraftStats()
    if not isinstance(draft_length, DraftLength):
        draft_length = DraftLength.for_models(model, drafter, draft_length)
    sample = TokenSampler(sampler, logits_processors, inputs["input_ids"][0])
    logits, hidden = prefill(model, inputs, prompt_cache, prefill_step_size, return_hidden=True)
    token, logprobs = sample(logits)
    value = token.item()
    yield value, logprobs, False
    emitted = 1
    while emitted < max_tokens:
        left = max_tokens - emitted
        k = min(draft_length.next(), left - 1, model.config.text.sliding_window)
        if k == 0:
            n = min(draft_length.stretch, left)
            start = time.perf_counter()
            for value, logprobs, hidden in _plain_stretch(model, sample, prompt_cache, value, n):
                stats.add_plain(1)
                yield value, logprobs, False
            draft_length.decoded(n, time.perf_counter() - start)
            emitted += n
            continue
        out, hidden = _speculative_round(model, drafter, sample, prompt_cache, value, hidden, k, draft_length)
        n = len(out) - 1  # accepted drafts, in the caches now
        stats.add(k, n)
        for i, (value, logprobs) in enumerate(out):
            try:
                yield value, logprobs, i < n
            except GeneratorExit:  # keep only the drafts handed out
                if i < n - 1:
                    prompt_cache.keep(len(prompt_cache.tokens) - (n - 1 - i))
                raise
        emitted += len(out)


def draft_and_verify(model, drafter, caches: list[list], last: mx.array, hidden: mx.array,
                     k: int) -> tuple[list[list[int]], mx.array, mx.array, float, float]:
    """B sequences' last tokens (B,), not in their caches yet ((B, 1, Dt) hidden: the states that
    predicted them): draft k tokens each, run the target once over the last token and the drafts ->
    (the drafts, B lists of k; the (B, k + 1, vocab) verify logits; the (B, k + 1, D) hidden
    states; the drafter's seconds; the verify pass's seconds). k = 0: a plain step."""
    start = time.perf_counter()
    drafts = last[:, None][:, :0]
    if k:
        drafts = drafter.draft(model, [model.shared_kv(c) for c in caches], last, hidden, k)
        mx.async_eval(drafts)  # the drafter runs while the verify pass's graph is built
    logits, hiddens = model.rows(mx.concatenate([last[:, None], drafts], axis=1), caches, return_hidden=True)
    mx.async_eval(logits, hiddens)
    proposed = drafts.tolist()
    drafted = time.perf_counter()
    mx.eval(logits)
    return proposed, logits, hiddens, drafted - start, time.perf_counter() - drafted


def verify(sample: TokenSampler, logits: mx.array, proposed: list[int]) -> list[tuple[int, mx.array]]:
    """Draw the target's token at each of the (1, k + 1, vocab) verify logits in turn until one
    differs from its draft in `proposed` (k of them) or all k matched -> [(id, logprobs)]: the
    accepted drafts, then the target's own token."""
    out = []
    for i in range(len(proposed) + 1):
        drawn, logprobs = sample(logits[:, i])
        out.append((drawn.item(), logprobs))
        if i == len(proposed) or out[-1][0] != proposed[i]:
            break
    return out


def settle(prompt_cache: PromptCache, token: int, proposed: list[int], n: int) -> None:
    """The caches just ran `token` and the drafts `proposed`: keep `token` and the first n drafts."""
    prompt_cache.tokens += [token, *proposed]
    if n < len(proposed):
        prompt_cache.keep(len(prompt_cache.tokens) - (len(proposed) - n))


def _weight_bytes(module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def _plain_stretch(model, sample: TokenSampler, prompt_cache: PromptCache, token: int,
                   n: int) -> Iterator[tuple[int, mx.array, mx.array]]:
    """The n tokens after `token` (emitted, not in the caches yet), decoded plainly, each with the
    (1, 1, D) hidden state that predicted it."""
    logits, hidden = model(mx.array([[token]], dtype=mx.int32), cache=prompt_cache.caches, logits_to_keep=1,
                           return_hidden=True)
    prompt_cache.tokens.append(token)
    first, logprobs = sample(logits[:, -1])
    steps = decode(model, sample, prompt_cache, first, logprobs, n, hidden)
    try:
        yield from steps
    finally:
        steps.close()


def _speculative_round(model, drafter, sample: TokenSampler, prompt_cache: PromptCache, token: int,
                       hidden: mx.array, k: int,
                       draft_length: DraftLength) -> tuple[list[tuple[int, mx.array]], mx.array]:
    """Draft k tokens after `token` (not in the caches yet; `hidden` (1, 1, D) predicted it), verify
    -> ([(id, logprobs)] accepted drafts then the target's token, the (1, 1, D) hidden state that
    predicted that last one). The caches end holding `token` and the accepted drafts; draft_length
    hears what the round cost and how much of it was accepted."""
    proposed, logits, hiddens, draft_seconds, pass_seconds = draft_and_verify(
        model, drafter, [prompt_cache.caches], mx.array([token], dtype=mx.int32), hidden, k)
    out = verify(sample, logits, proposed[0])
    n = len(out) - 1
    draft_length.drafted(k, n, draft_seconds, pass_seconds)
    settle(prompt_cache, token, proposed[0], n)
    return out, hiddens[:, n:n + 1]
