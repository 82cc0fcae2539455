"""Speculative decoding with an MTP drafter (draft.DraftModel): several tokens per target pass, same output.

    last token + the hidden state that predicted it --drafter, K steps--> K drafts
    --target, one pass over the last token and the K drafts (K + 1 positions)--> K + 1 logits
    --the plain loop's sampler, position by position--> the accepted drafts + the target's own token
    --every cache rewound to what was accepted

On a Mac a decode step reads every weight once, so a pass over K + 1 positions costs about what a
pass over one does, and each accepted draft is a token for free. Where the pass grows with K (this
CPU) or the drafter is rarely right, drafting loses: DraftLength measures both as it goes and picks
K each round, down to K = 0, where the engine decodes plainly and only now and then probes whether
drafting pays again. The engine (engine.py) runs the rounds, for one row or many.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_gemma4u.generation.prompt_cache import PromptCache
from mlx_gemma4u.generation.steps import TokenSampler


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
    def for_models(cls, model, drafter, fixed: int | DraftLength | None = None) -> DraftLength:
        """K for `drafter` on `model`: `fixed` (or that DraftLength itself), or adaptive with a
        drafter step first guessed at the drafter's share of the weights a decode step reads."""
        if isinstance(fixed, DraftLength):
            return fixed
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
        return sum(a**i for i in range(k + 1)) / (k * step + self.pass_cost(k + 1))

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


def draft_and_verify(
    model, drafter, caches: list[list], last: mx.array, hidden: mx.array, k: int
) -> tuple[list[list[int]], mx.array, mx.array, float, float]:
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
