"""The engine: B >= 1 sequences generated together, each getting exactly the tokens it gets alone.

    add(inputs, SamplingParams) -> queue --(admitted while under max_batch and max_kv_bytes)-->
    prefill alone (steps.prefill) --> rows --one step for all: a decode step, or with a drafter a
    speculative round--> (B, vocab) logits --> each row's own logits processors and sampler (its
    own seed) --> reply text, stop strings --> finished rows leave, queued prompts join

`stream_generate` is a one-row run of it; `batch_generate` and the server run many rows. Every
row keeps its own PromptCache (why, and how batching stays exact: docs/batching.md), so a row's
RoPE, masks and cache updates are those of the row alone; the Linears run over all rows at once.

A decode step runs ahead: the next step is queued on the rows' tokens before they are read back
and handed out, so the device computes while the caller handles this step's tokens. Whatever
fails while a row is admitted, handed out or stepped ends that row alone.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx

from mlx_gemma4u.errors import Gemma4UError, InputError
from mlx_gemma4u.generation.constraints import GrammarMask
from mlx_gemma4u.generation.inputs import check_context, prepare_inputs
from mlx_gemma4u.generation.params import SamplingParams
from mlx_gemma4u.generation.prompt_cache import PromptCache
from mlx_gemma4u.generation.reply import ReplyText
from mlx_gemma4u.generation.speculative import DraftLength, DraftStats, draft_and_verify, settle, verify
from mlx_gemma4u.generation.steps import TokenSampler, prefill
from mlx_gemma4u.models import parallel
from mlx_gemma4u.models.cache import rewind, rewind_room
from mlx_gemma4u.models.config import SLIDING

log = logging.getLogger(__name__)


@dataclass
class GenerationResponse:
    """One token handed out: its text segment and its reply's figures so far."""

    text: str
    token: int | None
    logprobs: mx.array | None  # (vocab,) float32 log-probabilities the token was drawn from
    prompt_tokens: int
    prefilled_tokens: int  # prompt tokens actually run (the rest came from the prompt cache)
    prompt_tps: float
    generation_tokens: int
    generation_tps: float  # tokens after the first over the time since the first
    peak_memory: float  # GB
    finish_reason: str | None = None  # "stop", "length", "error" (token None), or None
    from_draft: bool = False  # the token was drafted (and accepted), not the target's own next token
    draft: DraftStats | None = None  # with a draft model: the reply's drafting so far
    uid: int = 0  # which of the engine's sequences it belongs to


@dataclass
class BatchResponse:
    """One prompt's whole reply. finish_reason: "stop", "length", "cancelled", or "error" (then
    `error` says why, and `fault` whether it is a fault of ours rather than of the prompt)."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    fault: bool = False
    prompt_tokens: int = 0
    prefilled_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    latency: float = 0.0  # seconds from submission to the last token (queueing included)
    draft: DraftStats | None = None
    exception: BaseException | None = field(default=None, repr=False, compare=False)


class Sequence:
    """One prompt: its inputs, settings, caches, sampler, reply text and figures.

    pending: the (token, logprobs, drafted) to hand out next, in order, a token being an int or a
    (1,) array still computing. All but the last are in the caches (a round's accepted drafts);
    the last is too once `ahead` holds the step that ran on it. last: the last token handed out,
    not in the caches yet; hidden: the (1, 1, D) state that predicted it (drafting only).
    """

    def __init__(self, inputs: dict, params: SamplingParams, cache: PromptCache, kv_bytes: int, tokenizer, model):
        self.inputs, self.params, self.prompt_cache, self.kv_bytes = inputs, params, cache, kv_bytes
        ids = inputs["input_ids"]
        self.reply = ReplyText(tokenizer, list(params.stop))
        self.response = BatchResponse(prompt_tokens=ids.shape[1])
        processors = params.logits_processors()
        if params.response_format is not None:
            if tokenizer is None:
                raise InputError("A response format needs the model's tokenizer; pass its processor.")
            vocab, thinking = model.config.text.vocab_size, params.enable_thinking
            processors.append(GrammarMask(params.response_format, tokenizer, vocab, ids.shape[1], thinking))
        self.constrained = params.response_format is not None
        self.sampler = TokenSampler(params.sampler(), processors, ids[0], params.seed)
        self.pending: list[tuple] = []
        self.ahead: tuple | None = None  # (token, logprobs, hidden) of the step that ran on pending[-1]
        self.last: int | None = None
        self.hidden: mx.array | None = None
        self.submitted = time.perf_counter()
        self.started = self.first_at = 0.0

    @property
    def left(self) -> int:
        """Tokens it may still produce after the pending ones."""
        return self.params.max_tokens - len(self.response.tokens) - len(self.pending)

    def prefill(self, model, prefill_step_size: int, drafting: bool) -> mx.array:
        """Prefill alone -> the (1, vocab) logits of the prompt's last position."""
        self.started = time.perf_counter()
        out = prefill(model, self.inputs, self.prompt_cache, prefill_step_size, return_hidden=drafting)
        logits, self.hidden = out if drafting else (out, None)
        if self.constrained:  # the grammar's mask is computed while the prompt's last chunk runs
            mx.async_eval(logits)
        return logits

    def start(self, logits: mx.array, drafting: bool) -> None:
        """Draw the first token from the prompt's logits (pending, still computing)."""
        token, logprobs = self.sampler(logits)
        mx.async_eval([token, self.sampler.history] if self.constrained else token)
        self.pending = [(token, logprobs, False)]
        self.response.prefilled_tokens = self.response.prompt_tokens - self.prompt_cache.reused
        self.response.draft = DraftStats() if drafting else None
        self.inputs = None  # the media arrays are no longer needed

    def hand_out(self, uid: int) -> list[GenerationResponse]:
        """Hand out the pending tokens up to the reply's finish; the step that ran ahead, if any,
        becomes the next pending token."""
        events, pending, ahead = [], self.pending, self.ahead
        self.pending, self.ahead = [], None
        for i, (token, logprobs, drafted) in enumerate(pending):
            value = token if isinstance(token, int) else token.item()
            if ahead is not None and i == len(pending) - 1:  # the step ran on it: the caches hold it
                self.prompt_cache.tokens.append(value)
            events.append(self._add(uid, value, logprobs, drafted))
            if events[-1].finish_reason:
                self._leave(len(pending) - 2 - i)
                return events
        self.last = value
        if ahead is not None:
            token, logprobs, hidden = ahead
            self.pending, self.hidden = [(token, logprobs, False)], hidden
        return events

    def _add(self, uid: int, value: int, logprobs: mx.array, drafted: bool) -> GenerationResponse:
        r, now = self.response, time.perf_counter()
        if not r.tokens:
            self.first_at = now
            r.prompt_tps = r.prefilled_tokens / max(now - self.started, 1e-9)
        r.tokens.append(value)
        segment, finish = self.reply.add(value, last=len(r.tokens) == self.params.max_tokens)
        r.text += segment
        r.finish_reason, r.generation_tokens, r.latency = finish, len(r.tokens), now - self.submitted
        r.generation_tps = (len(r.tokens) - 1) / (now - self.first_at) if len(r.tokens) > 1 else 0.0
        return _event(r, uid, segment, value, logprobs, finish, drafted)

    def _leave(self, extra: int) -> None:
        """The reply finished with `extra` accepted drafts after it still in the caches: drop them
        (and a step run ahead on the last), so that a caller's PromptCache holds what it says."""
        _roll_back(self.prompt_cache)
        if extra > 0:
            self.prompt_cache.keep(len(self.prompt_cache.tokens) - extra)


class BatchGenerator:
    """Generates many sequences together; sequences join while others decode and leave when done.

    max_batch: sequences decoding at once. max_kv_bytes: bound on the KV caches of all of them
    together, each counted at its largest (prompt plus max_tokens); a prompt that would pass a
    bound waits in the queue. draft_model / num_draft_tokens: speculative decoding, one round for
    all rows per step, each row keeping its own accepted length (see speculative.DraftLength; a
    DraftLength may be given as num_draft_tokens). processor None: prompts come only through `add`,
    and replies are token ids (no text, no end-of-turn stop).

        engine = BatchGenerator(model, processor, max_batch=8)
        uid = engine.submit("Hello", max_tokens=32)
        while not engine.done:
            for response in engine.step(): ...  # GenerationResponse, with .uid
        engine.responses[uid]
    """

    def __init__(
        self,
        model,
        processor,
        max_batch: int = 8,
        max_kv_bytes: int | None = None,
        prefill_step_size: int = 512,
        draft_model=None,
        num_draft_tokens: int | None = None,
    ):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise InputError(f"max_batch must be a positive integer, got {max_batch!r}.")
        if max_kv_bytes is not None and max_kv_bytes <= 0:
            raise InputError(f"max_kv_bytes must be positive (or unset), got {max_kv_bytes!r}.")
        self.model, self.processor = model, processor
        self.max_batch, self.max_kv_bytes, self.prefill_step_size = max_batch, max_kv_bytes, prefill_step_size
        self.responses: dict[int, BatchResponse] = {}
        self._queue: deque[tuple[int, Sequence]] = deque()
        self._active: dict[int, Sequence] = {}
        self.drafter = draft_model
        if draft_model is not None:
            draft_model.check_target(model)
            self.draft_length = DraftLength.for_models(model, draft_model, num_draft_tokens)
            self._plain_left, self._plain_steps, self._plain_since = 0, 0, 0.0  # the plain stretch under way

    @property
    def done(self) -> bool:
        return not self._queue and not self._active

    def submit(
        self,
        prompt,
        images=None,
        videos=None,
        audio=None,
        params: SamplingParams | None = None,
        prompt_cache: PromptCache | None = None,
        **settings,
    ) -> int:
        """Queue one prompt in any form stream_generate takes -> its id. `settings`: SamplingParams'
        fields (over `params`), the rest go to the processor. A bad prompt or setting does not
        raise: its response is finished at once with the error."""
        try:
            params, processor_kwargs = SamplingParams.split(settings, params)
            inputs = prepare_inputs(
                self.processor, prompt, images, videos, audio, params.enable_thinking, **processor_kwargs
            )
            return self.add(inputs, params, prompt_cache)
        except Exception as error:  # a bad prompt or file's own message is worth showing
            uid = len(self.responses)
            self.responses[uid] = BatchResponse()
            self._fail(uid, error, told=(Gemma4UError, TypeError, ValueError, OSError))
            return uid

    def add(self, inputs: dict, params: SamplingParams | None = None, prompt_cache: PromptCache | None = None) -> int:
        """Queue one prompt already through the processor (prepare_inputs' arrays) -> its id.
        Raises InputError for a prompt the engine cannot take (too long, too large a cache)."""
        params = params if params is not None else SamplingParams()
        n_prompt = inputs["input_ids"].shape[1]
        check_context(self.model, n_prompt, params.max_tokens)
        cache = prompt_cache if prompt_cache is not None else PromptCache(self.model, params.kv_bits)
        if params.kv_bits is not None and cache.kv_bits != params.kv_bits:
            raise InputError(
                f"kv_bits is {params.kv_bits} but the prompt cache was made with kv_bits "
                f"{cache.kv_bits}; make the PromptCache with the kv_bits you want."
            )
        need = 0 if self.max_kv_bytes is None else kv_bytes(self.model, n_prompt + params.max_tokens, cache.kv_bits)
        if need > (self.max_kv_bytes or need):
            raise InputError(
                f"This prompt's KV caches need up to {need:,} bytes, more than max_kv_bytes "
                f"({self.max_kv_bytes:,}); lower max_tokens or raise the bound."
            )
        uid = len(self.responses)
        tokenizer = self.processor.tokenizer if self.processor is not None else None
        sequence = Sequence(inputs, params, cache, need, tokenizer, self.model)
        self.responses[uid] = sequence.response
        self._queue.append((uid, sequence))
        return uid

    def step(self) -> list[GenerationResponse]:
        """Admit what fits, then one step for every row -> the tokens handed out (finish_reason
        "error" for a row that failed: its response says why)."""
        events = self._admit()
        k = self._round_length() if self.drafter is not None else 0
        if self.drafter is not None and self.model.group is not None:  # a split model: K is timed on each
            k = parallel.from_first(k, self.model.group)  # process's own clock, so all take the first's
        if k == 0:
            self._advance(self._decode, {u: s for u, s in self._active.items() if s.left > 0}, events)
        for uid, sequence in list(self._active.items()):
            try:
                handed = sequence.hand_out(uid)
                events += handed
                if handed and handed[-1].finish_reason:
                    del self._active[uid]  # its caches go with it (unless the caller passed the PromptCache)
            except Exception as error:
                self._lost(uid, error, events)
        if k:
            self._advance(lambda rows: self._round(rows, k), self._active, events)
        if self.drafter is not None and k == 0:
            self._count_plain()
        return events

    def cancel(self, uid: int) -> None:
        """Stop sequence `uid` now (its client went away): it leaves the queue or the batch, its
        response keeps what it has."""
        self._queue = deque((u, s) for u, s in self._queue if u != uid)
        sequence = self._active.pop(uid, None)
        if sequence is not None:
            _roll_back(sequence.prompt_cache)
            self.responses[uid].finish_reason = self.responses[uid].finish_reason or "cancelled"

    def _admit(self) -> list[GenerationResponse]:
        events = []
        while self._queue and len(self._active) < self.max_batch and self._fits(self._queue[0][1]):
            uid, sequence = self._queue.popleft()
            self._active[uid] = sequence
            drafting = self.drafter is not None
            try:
                logits = sequence.prefill(self.model, self.prefill_step_size, drafting)
            except Exception as error:
                self._lost(uid, error, events)
                continue
            try:
                sequence.start(logits, drafting)
            except Exception as error:
                self._drop(uid, error, events)
        return events

    def _fits(self, sequence: Sequence) -> bool:
        if self.max_kv_bytes is None:
            return True
        return sum(s.kv_bytes for s in self._active.values()) + sequence.kv_bytes <= self.max_kv_bytes

    def _advance(self, step: Callable, rows: dict[int, Sequence], events: list) -> None:
        """Run `step` for `rows`. A row whose own part (its sampling, its acceptance) fails is
        dropped; if the batched pass itself fails, every row is rolled back and stepped alone, so
        that only the rows that fail alone are dropped (on a model split across processes, the
        failure ends the step instead: see `_lost`)."""
        if not rows:
            return
        try:
            failed = step(rows)
        except Exception as error:
            if self.model.group is not None:
                raise
            failed = {uid: error for uid in rows} if len(rows) == 1 else self._one_by_one(step, rows)
        for uid, error in failed.items():
            self._drop(uid, error, events)

    @staticmethod
    def _one_by_one(step: Callable, rows: dict[int, Sequence]) -> dict[int, Exception]:
        failed = {}
        for uid, sequence in rows.items():
            _roll_back(sequence.prompt_cache)
            try:
                failed.update(step({uid: sequence}))
            except Exception as error:
                failed[uid] = error
        return failed

    def _decode(self, rows: dict[int, Sequence]) -> dict[int, Exception]:
        """One decode step on each row's last pending token (still computing, maybe), run ahead of
        handing it out -> the rows whose sampling failed."""
        sequences = list(rows.values())
        tokens = mx.concatenate([_as_array(s.pending[-1][0]) for s in sequences])[:, None]
        drafting = self.drafter is not None
        logits, hidden = _forward(self.model, tokens, [s.prompt_cache.caches for s in sequences], drafting)
        if any(s.constrained for s in sequences):  # the grammars' masks are computed while the step runs
            mx.async_eval(logits)
        failed = {}
        for i, (uid, sequence) in enumerate(rows.items()):
            try:
                token, logprobs = sequence.sampler(logits[i : i + 1, -1])
            except Exception as error:
                failed[uid] = error
                continue
            sequence.ahead = (token, logprobs, hidden[i : i + 1] if drafting else None)
            if drafting:
                sequence.response.draft.add_plain(1)
        ready = [s for uid, s in rows.items() if uid not in failed]
        # a grammar's history too, so that it reads its next token without waiting on the next step
        mx.async_eval([s.ahead[0] for s in ready] + [s.sampler.history for s in ready if s.constrained])
        return failed

    def _round(self, rows: dict[int, Sequence], k: int) -> dict[int, Exception]:
        """One speculative round for all rows: each row's last token and k drafts verified in one
        (B, k + 1) pass; each row keeps its own accepted length and is rewound to it -> the rows
        whose own verification failed."""
        sequences = list(rows.values())
        last = mx.array([s.last for s in sequences], dtype=mx.int32)
        proposed, logits, hiddens, draft_seconds, pass_seconds = draft_and_verify(
            self.model,
            self.drafter,
            [s.prompt_cache.caches for s in sequences],
            last,
            mx.concatenate([s.hidden for s in sequences]),
            k,
        )
        failed = {}
        for i, (uid, sequence) in enumerate(rows.items()):
            try:
                out = verify(sequence.sampler, logits[i : i + 1], proposed[i])
            except Exception as error:
                failed[uid] = error
                continue
            n = len(out) - 1
            settle(sequence.prompt_cache, sequence.last, proposed[i], n)
            sequence.pending = [(value, logprobs, j < n) for j, (value, logprobs) in enumerate(out)]
            sequence.hidden = hiddens[i : i + 1, n : n + 1]
            sequence.response.draft.add(k, n)
            self.draft_length.drafted(k, n, draft_seconds, pass_seconds)
        return failed

    def _round_length(self) -> int:
        """K for this step's round; 0 within a plain stretch (DraftLength's length, timed whole)."""
        if self._plain_left or not self._active:
            return 0
        left = max(s.left for s in self._active.values())
        k = min(self.draft_length.next(), self.model.config.text.sliding_window, left - 1)
        if k <= 0:
            self._plain_left = self._plain_steps = max(1, min(self.draft_length.stretch, left))
            self._plain_since = time.perf_counter()
            return 0
        return k

    def _count_plain(self) -> None:
        if self._plain_left:
            self._plain_left -= 1
            if self._plain_left == 0:
                self.draft_length.decoded(self._plain_steps, time.perf_counter() - self._plain_since)

    def _lost(self, uid: int, error: Exception, events: list) -> None:
        """A pass of the model failed for `uid`: it is dropped alone. On a model split across
        processes the failure may be this process's alone, and the others would wait for its part
        of the next collective: the error ends the step (and the group)."""
        if self.model.group is not None:
            raise error
        self._drop(uid, error, events)

    def _drop(self, uid: int, error: Exception, events: list) -> None:
        """End active sequence `uid` with `error` (an "error" event), its caches holding just the
        tokens they say they hold."""
        _roll_back(self._active.pop(uid).prompt_cache)
        self._fail(uid, error)
        events.append(_event(self.responses[uid], uid, finish="error"))

    def _fail(self, uid: int, error: Exception, told: tuple = (Gemma4UError,)) -> None:
        """Finish `uid`'s response with the error: its own message for the `told` kinds, else (a
        fault of ours) its type, the traceback going to the log."""
        fault = not isinstance(error, told)
        if fault:
            log.error("sequence %d failed", uid, exc_info=error)
        r = self.responses[uid]  # it keeps the tokens it had
        r.finish_reason, r.fault, r.exception = "error", fault, error
        r.error = f"Internal error ({type(error).__name__})." if fault else str(error)


def _forward(model, tokens: mx.array, caches: list[list], hidden: bool) -> tuple[mx.array, mx.array | None]:
    """(B, 1) next tokens of B rows -> (B, 1, vocab) logits and (with `hidden`) the (B, 1, D) final
    states; one row runs the model's own single-sequence pass."""
    if len(caches) == 1:
        out = model(tokens, cache=caches[0], logits_to_keep=1, return_hidden=hidden)
    else:
        out = model.rows(tokens, caches, return_hidden=hidden)
    return out if hidden else (out, None)


def _event(r: BatchResponse, uid: int, text="", token=None, logprobs=None, finish=None, drafted=False):
    """A GenerationResponse for `uid`'s latest token (None for an error) with its reply's figures so far."""
    figures = (r.prompt_tokens, r.prefilled_tokens, r.prompt_tps, r.generation_tokens, r.generation_tps)
    peak = mx.get_peak_memory() / 1e9
    return GenerationResponse(text, token, logprobs, *figures, peak, finish, drafted, r.draft, uid)


def _as_array(token) -> mx.array:
    return mx.array([token], dtype=mx.int32) if isinstance(token, int) else token


def _roll_back(prompt_cache: PromptCache) -> None:
    """Take back from the caches anything a step added past the tokens they are known to hold."""
    held = len(prompt_cache.tokens)
    for cache in prompt_cache.caches:
        if cache.offset > held:
            rewind(cache, cache.offset - held)


def kv_bytes(model, n_tokens: int, kv_bits: int | None = None) -> int:
    """Bytes the KV caches of one sequence of n_tokens hold at most: full layers keep every token
    (kv_bits-quantized: the packed values plus a scale and bias per group), sliding layers their
    window plus rewind room."""
    text = model.config.text
    itemsize = model.language_model.norm.weight.dtype.size
    total = 0
    for spec in text.layers:
        if spec.kv_mode == "reuse":
            continue
        elements = 2 * spec.num_kv_heads * spec.head_dim  # keys and values per token
        if spec.layer_type == SLIDING:
            total += min(n_tokens, text.sliding_window + rewind_room(text)) * elements * itemsize
        elif kv_bits is None:
            total += n_tokens * elements * itemsize
        else:
            group = 64 if spec.head_dim % 64 == 0 else 32
            total += n_tokens * (elements * kv_bits // 8 + 2 * (elements // group) * itemsize)
    return total
