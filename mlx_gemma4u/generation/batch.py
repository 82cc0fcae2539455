"""Batched generation: many prompts decoded together, each getting exactly the tokens it gets alone.

    submit(prompt, media, settings) -> queue --(admitted while under max_batch and max_kv_bytes)-->
    prefill alone (generate.prefill: chunked, vision blocks whole, prompt-cache prefix reused) -->
    active rows --one decode step for all: embeddings, every Linear / MLP / norm and the head over the
    B rows (the weights are read once per step); RoPE, cache update, mask and attention per row
    against the row's own caches (decoder.RowSteps)--> (B, vocab) logits --> each row's own logits
    processors and sampler (its own seed) --> detokenize, stop strings --> finished rows leave and
    their caches are freed; queued prompts join at the next step (continuous batching)

Why every sequence keeps its own PromptCache instead of mlx-lm's BatchKVCache /
BatchRotatingKVCache: those hold all rows in one left-padded tensor, so (1) they cannot be
quantized (BatchRotatingKVCache.to_quantized raises, BatchKVCache has none), which kv_bits needs;
(2) their rotating buffer is the bare window, without the rewind room that lets a conversation take
back tokens after the buffer wrapped (cache.py), and a saved PromptCache prefix would have to be
copied in and out of the padded tensor; (3) a row's keys would sit at padded slots, so the
vision-block masks and key positions of the single-sequence path (masks.py, cache.key_positions)
would need a second, padded formulation, where separate caches make them the same code; (4) every
row would attend over the longest row's keys. What they save, one attention call per layer instead
of B, is the small part of a decode step: the weights, read once for all rows, are the large part.

With a drafter (speculative.py), a step is one speculative round for every row: the rows draft K
tokens together (the drafter's Linears batched the same way, each row attending to its own keys),
one (B, K + 1) pass verifies them, and each row accepts, samples and rewinds by its own count.

Exactness: MLX's CPU matmuls (float32, bfloat16, 4-bit) give each row of a (B, D) product bit for
bit what the row gives alone, so batching the Linears changes no token; tests/test_batch.py checks
whole greedy replies against stream_generate.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from mlx_gemma4u.models.cache import PromptCache, rewind, rewind_room
from mlx_gemma4u.models.config import SLIDING
from mlx_gemma4u.errors import Gemma4UError, InputError
from mlx_gemma4u.generation.reply import ReplyText
from mlx_gemma4u.generation.generate import TokenSampler, check_context, check_settings, prefill, prepare_inputs
from mlx_gemma4u.generation.speculative import DraftLength, DraftStats, draft_and_verify, settle, verify

SAMPLING = {"max_tokens": 256, "temperature": 0.0, "top_p": 0.0, "top_k": 0, "min_p": 0.0, "seed": None,
            "repetition_penalty": None, "presence_penalty": None, "frequency_penalty": None, "stop": None,
            "kv_bits": None, "prompt_cache": None}
log = logging.getLogger(__name__)


class Event(NamedTuple):
    """One token handed out by `BatchGenerator.step` (token None and finish "error" for a sequence
    that failed: its response says why)."""

    uid: int
    token: int | None
    text: str
    finish: str | None
    logprobs: mx.array | None  # (vocab,) float32 log-probabilities the token was drawn from


@dataclass
class BatchResponse:
    """One prompt's whole reply. finish_reason: "stop", "length", or "error" (then `error` says why)."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    fault: bool = False  # the error is a fault of ours, not of the prompt or its settings
    prompt_tokens: int = 0
    prefilled_tokens: int = 0  # prompt tokens actually run (the rest came from the prompt cache)
    prompt_tps: float = 0.0  # this prompt's prefill, tokens/s
    generation_tokens: int = 0
    generation_tps: float = 0.0  # this sequence's tokens over its own time from first to last token
    latency: float = 0.0  # seconds from submission to the last token (queueing included)
    draft: DraftStats | None = None  # with a draft model: this sequence's drafting


class _Sequence:
    """One admitted or queued prompt: its inputs, caches, sampler, text and running statistics."""

    def __init__(self, inputs: dict, settings: dict, prompt_cache: PromptCache, kv_bytes: int, tokenizer):
        self.inputs, self.settings, self.prompt_cache, self.kv_bytes = inputs, settings, prompt_cache, kv_bytes
        self.max_tokens = settings["max_tokens"]
        self.reply = ReplyText(tokenizer, settings["stop"])
        self.response = BatchResponse(prompt_tokens=inputs["input_ids"].shape[1])
        self.submitted = time.perf_counter()
        self.first_token_at = 0.0
        self.token: mx.array | None = None  # the sampled, not yet handed out token, (1,)
        self.logprobs: mx.array | None = None  # its log-probabilities over the vocabulary
        self.sampler: TokenSampler | None = None
        # Drafting: the (id, logprobs) a round produced, to hand out in order (all but the last are in
        # the caches), and the (1, 1, D) hidden state that predicted the last.
        self.pending: list[tuple[int, mx.array]] = []
        self.hidden: mx.array | None = None

    def start(self, model, prefill_step_size: int, drafting: bool = False) -> None:
        """Prefill alone and sample the first token (left pending; with its hidden state if drafting)."""
        s = self.settings
        sampler = make_sampler(temp=s["temperature"], top_p=s["top_p"], top_k=s["top_k"], min_p=s["min_p"])
        processors = make_logits_processors(repetition_penalty=s["repetition_penalty"],
                                            presence_penalty=s["presence_penalty"],
                                            frequency_penalty=s["frequency_penalty"])
        self.sampler = TokenSampler(sampler, processors, self.inputs["input_ids"][0], s["seed"])
        begin = time.perf_counter()
        out = prefill(model, self.inputs, self.prompt_cache, prefill_step_size, return_hidden=drafting)
        logits, self.hidden = out if drafting else (out, None)
        self.token, self.logprobs = self.sampler(logits)
        mx.eval(self.token)
        if drafting:
            self.pending, self.response.draft = [(self.token.item(), self.logprobs)], DraftStats()
        r = self.response
        r.prefilled_tokens = r.prompt_tokens - self.prompt_cache.reused
        self.first_token_at = time.perf_counter()
        r.prompt_tps = r.prefilled_tokens / max(self.first_token_at - begin, 1e-9)
        self.inputs = None  # the media arrays are no longer needed

    def take(self) -> list[tuple[int, mx.array]]:
        """The (id, logprobs) to hand out now: a round's accepted drafts then the target's own token
        when drafting, else the one pending token."""
        return self.pending or [(self.token.item(), self.logprobs)]

    def leave(self, last: int) -> None:
        """The sequence finished at pending token `last` (an index): drop the drafts after it from
        the caches, so a caller's PromptCache holds what it says."""
        extra = len(self.pending) - 2 - last  # the pending tokens in the caches: all but the final one
        if extra > 0:
            self.prompt_cache.keep(len(self.prompt_cache.tokens) - extra)

    def hand_out(self, value: int) -> tuple[int, str, str | None]:
        """Hand out token `value` -> (token, text to show, finish reason or None)."""
        r = self.response
        r.tokens.append(value)
        segment, finish = self.reply.add(value, last=len(r.tokens) == self.max_tokens)
        r.text += segment
        now = time.perf_counter()
        r.generation_tokens, r.latency = len(r.tokens), now - self.submitted
        r.generation_tps = (len(r.tokens) - 1) / (now - self.first_token_at) if len(r.tokens) > 1 else 0.0
        r.finish_reason = finish
        return value, segment, finish


class BatchGenerator:
    """Decodes many sequences together; sequences join while others decode and leave when done.

    max_batch: sequences decoding at once. max_kv_bytes: bound on the KV caches of all of them
    together, each sequence counted at its largest (prompt plus max_tokens); a prompt that would
    pass a bound waits in the queue, one that could never fit gets an error response.

        gen = BatchGenerator(model, processor, max_batch=8)
        uid = gen.submit("Hello", max_tokens=32)
        while not gen.done:
            for event in gen.step(): ...  # (uid, token, text, finish, logprobs)
        gen.responses[uid]
    """

    def __init__(self, model, processor, max_batch: int = 8, max_kv_bytes: int | None = None,
                 prefill_step_size: int = 512, draft_model=None, num_draft_tokens: int | None = None):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise InputError(f"max_batch must be a positive integer, got {max_batch!r}.")
        if max_kv_bytes is not None and max_kv_bytes <= 0:
            raise InputError(f"max_kv_bytes must be positive (or unset), got {max_kv_bytes!r}.")
        self.model, self.processor = model, processor
        self.max_batch, self.max_kv_bytes, self.prefill_step_size = max_batch, max_kv_bytes, prefill_step_size
        self.responses: dict[int, BatchResponse] = {}
        self._queue: deque[tuple[int, _Sequence]] = deque()
        self._active: dict[int, _Sequence] = {}
        self.drafter = draft_model
        if draft_model is not None:
            draft_model.check_target(model)
            self.draft_length = DraftLength.for_models(model, draft_model, num_draft_tokens)
            self._plain_left, self._plain_seconds = 0, 0.0  # the plain stretch under way (K = 0)

    @property
    def done(self) -> bool:
        return not self._queue and not self._active

    def submit(self, prompt, images=None, videos=None, audio=None, enable_thinking: bool = False,
               **settings) -> int:
        """Queue one prompt (see stream_generate for the prompt forms and settings; settings not in
        SAMPLING go to the processor, as there) -> its id.

        A bad prompt or setting does not raise: its response is finished at once with the error.
        """
        processor_kwargs = {k: v for k, v in settings.items() if k not in SAMPLING}
        try:
            inputs = prepare_inputs(self.processor, prompt, images, videos, audio, enable_thinking, **processor_kwargs)
        except Exception as error:  # a bad prompt or file's own message is worth showing
            return self._fail(len(self.responses), error, told=(Gemma4UError, TypeError, ValueError, OSError))
        return self.add(inputs, **{k: v for k, v in settings.items() if k in SAMPLING})

    def add(self, inputs: dict, **settings) -> int:
        """Queue one prompt already through the processor (prepare_inputs' arrays) with its
        settings (SAMPLING's names) -> its id; like submit, a bad setting finishes it at once."""
        uid = len(self.responses)
        self.responses[uid] = BatchResponse()
        try:
            s = {**SAMPLING, **settings}
            check_settings(**{k: v for k, v in s.items() if k != "prompt_cache"})
            n_prompt = inputs["input_ids"].shape[1]
            check_context(self.model, n_prompt, s["max_tokens"])
            need = kv_bytes(self.model, n_prompt + s["max_tokens"], s["kv_bits"])
            if self.max_kv_bytes is not None and need > self.max_kv_bytes:
                raise InputError(f"This prompt's KV caches need up to {need:,} bytes, more than max_kv_bytes "
                                 f"({self.max_kv_bytes:,}); lower max_tokens or raise the bound.")
            cache = s["prompt_cache"] if s["prompt_cache"] is not None else PromptCache(self.model, s["kv_bits"])
        except Exception as error:
            return self._fail(uid, error)
        sequence = _Sequence(inputs, s, cache, need, self.processor.tokenizer)
        self.responses[uid] = sequence.response
        self._queue.append((uid, sequence))
        return uid

    def step(self) -> list[Event]:
        """Admit what fits, then hand out one token per active sequence and run one decode step for
        those that go on -> the tokens handed out.

        Whatever fails while a sequence is admitted, handed out or stepped ends that sequence alone
        (an "error" event; its response says why): the others go on as if it had never been there.
        """
        events = self._admit()
        going = {}
        for uid, sequence in list(self._active.items()):
            try:
                finished = self._hand_out(uid, sequence, events)
            except Exception as error:
                finished = self._drop(uid, error, events)
            if not finished:
                going[uid] = sequence
        if going:
            self._advance(going, events)
        return events

    def _hand_out(self, uid: int, sequence: "_Sequence", events: list[Event]) -> bool:
        """Hand out the sequence's pending tokens up to its finish -> whether it finished."""
        for n, (value, logprobs) in enumerate(sequence.take()):
            token, segment, finish = sequence.hand_out(value)
            events.append(Event(uid, token, segment, finish, logprobs))
            if finish:
                sequence.leave(n)  # its caches go with it (unless the caller passed the PromptCache)
                del self._active[uid]
                return True
        return False

    def _advance(self, going: dict[int, "_Sequence"], events: list[Event]) -> None:
        """One decode step (or speculative round) for all going rows. A row whose own part (its
        sampling, its acceptance) fails is dropped; if the batched pass itself fails, every row is
        rolled back and stepped alone, so that only the rows that fail alone are dropped."""
        step = self._decode if self.drafter is None else self._draft
        try:
            failed = step(going)
        except Exception as error:
            failed = {uid: error for uid in going} if len(going) == 1 else self._one_by_one(step, going)
        for uid, error in failed.items():
            self._drop(uid, error, events)

    @staticmethod
    def _one_by_one(step, going: dict[int, "_Sequence"]) -> dict[int, Exception]:
        failed = {}
        for uid, sequence in going.items():
            _roll_back(sequence.prompt_cache)
            try:
                failed.update(step({uid: sequence}))
            except Exception as error:
                failed[uid] = error
        return failed

    def _drop(self, uid: int, error: Exception, events: list[Event]) -> bool:
        """End active sequence `uid` with `error` (an "error" event), its caches holding just the
        tokens they say they hold -> True."""
        _roll_back(self._active.pop(uid).prompt_cache)
        self._fail(uid, error)
        events.append(Event(uid, None, "", "error", None))
        return True

    def cancel(self, uid: int) -> None:
        """Stop sequence `uid` now (its client went away): it leaves the queue or the batch, its
        response keeps what it has."""
        self._queue = deque((u, s) for u, s in self._queue if u != uid)
        if self._active.pop(uid, None) is not None:
            self.responses[uid].finish_reason = self.responses[uid].finish_reason or "cancelled"

    def _admit(self) -> list[Event]:
        events = []
        while self._queue and len(self._active) < self.max_batch and self._fits(self._queue[0][1]):
            uid, sequence = self._queue.popleft()
            self._active[uid] = sequence
            try:
                sequence.start(self.model, self.prefill_step_size, drafting=self.drafter is not None)
            except Exception as error:
                self._drop(uid, error, events)
        return events

    def _fits(self, sequence: _Sequence) -> bool:
        if self.max_kv_bytes is None:
            return True
        return sum(s.kv_bytes for s in self._active.values()) + sequence.kv_bytes <= self.max_kv_bytes

    def _decode(self, going: dict[int, _Sequence]) -> dict[int, Exception]:
        """One step for all rows: feed each row's handed-out token, sample each row's next one ->
        the rows whose sampling failed."""
        sequences = list(going.values())
        tokens = mx.concatenate([s.token for s in sequences])[:, None]
        logits = self.model.rows(tokens, [s.prompt_cache.caches for s in sequences])
        failed = {}
        for i, (uid, sequence) in enumerate(going.items()):
            try:
                token, logprobs = sequence.sampler(logits[i:i + 1, -1])
            except Exception as error:
                failed[uid] = error
                continue
            sequence.prompt_cache.tokens.append(sequence.response.tokens[-1])
            sequence.token, sequence.logprobs = token, logprobs
        mx.async_eval([s.token for uid, s in going.items() if uid not in failed])
        return failed

    def _draft(self, going: dict[int, _Sequence]) -> dict[int, Exception]:
        """One speculative round for all rows (speculative.py's, rows batched): each row's last token
        and K drafts verified in one (B, K + 1) pass; each row keeps its own accepted length and is
        rewound to it. K = 0: a plain step, within a plain stretch of DraftLength's length. -> The
        rows whose own verification failed."""
        sequences = list(going.values())
        if self._plain_left == 0:
            k = min(self.draft_length.next(), self.model.config.text.sliding_window)
            if k == 0:
                self._plain_left, self._plain_seconds = self.draft_length.stretch, 0.0
        else:
            k = 0
        last = mx.array([s.pending[-1][0] for s in sequences], dtype=mx.int32)
        start = time.perf_counter()
        proposed, logits, hiddens, draft_seconds, pass_seconds = draft_and_verify(
            self.model, self.drafter, [s.prompt_cache.caches for s in sequences], last,
            mx.concatenate([s.hidden for s in sequences]), k)
        failed = {}
        for i, (uid, sequence) in enumerate(going.items()):
            try:
                out = verify(sequence.sampler, logits[i:i + 1], proposed[i])
            except Exception as error:
                failed[uid] = error
                continue
            self._keep_round(sequence, out, proposed[i], hiddens[i:i + 1], k)
            if k:
                self.draft_length.drafted(k, len(out) - 1, draft_seconds, pass_seconds)
        if k == 0:
            self._plain_left -= 1
            self._plain_seconds += time.perf_counter() - start
            if self._plain_left == 0:
                self.draft_length.decoded(self.draft_length.stretch, self._plain_seconds)
        return failed

    @staticmethod
    def _keep_round(sequence: _Sequence, out: list, proposed: list[int], hiddens: mx.array, k: int) -> None:
        """A row's round: `out` its accepted drafts then the target's token -> pending; the caches
        keep its last token and the accepted drafts."""
        n = len(out) - 1
        settle(sequence.prompt_cache, sequence.pending[-1][0], proposed, n)
        sequence.pending, sequence.hidden = out, hiddens[:, n:n + 1]
        if k:
            sequence.response.draft.add(k, n)
        else:
            sequence.response.draft.add_plain(1)

    def _fail(self, uid: int, error: Exception, told: tuple = (Gemma4UError,)) -> int:
        """Finish `uid`'s response with the error: its own message for the `told` kinds, else (a
        fault of ours) its type, the traceback going to the log."""
        fault = not isinstance(error, told)
        if fault:
            log.error("sequence %d failed", uid, exc_info=error)
        message = f"Internal error ({type(error).__name__})." if fault else str(error)
        response = self.responses.setdefault(uid, BatchResponse())  # it keeps the tokens it had
        response.finish_reason, response.error, response.fault = "error", message, fault
        return uid


def _roll_back(prompt_cache: PromptCache) -> None:
    """Take back from the caches anything a failed step added past the tokens they are known to hold."""
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


def batch_generate(model, processor, prompts: list, max_tokens: int = 256, max_batch: int = 8,
                   max_kv_bytes: int | None = None, prefill_step_size: int = 512, draft_model=None,
                   num_draft_tokens: int | None = None, **sampling) -> list[BatchResponse]:
    """The replies to `prompts`, in order, decoded together.

    Each prompt is a prompt as stream_generate takes it, or a dict {"prompt": ..., "images": ...,
    "videos": ..., "audio": ..., and any setting}: its settings (max_tokens, temperature, top_p,
    top_k, min_p, seed, penalties, stop, kv_bits, prompt_cache) override the shared ones given here.
    A prompt that fails gets a response with finish_reason "error"; the others are unaffected.
    draft_model / num_draft_tokens: speculative decoding as in stream_generate, every row keeping
    its own accepted length (each response's .draft says how it went).
    """
    generator = BatchGenerator(model, processor, max_batch, max_kv_bytes, prefill_step_size, draft_model,
                               num_draft_tokens)
    for prompt in prompts:
        own = dict(prompt) if isinstance(prompt, dict) else {"prompt": prompt}
        if "prompt" not in own:
            own = {"prompt": None}  # refused by prepare_inputs with the prompt forms it takes
        generator.submit(own.pop("prompt"), **{"max_tokens": max_tokens, **sampling, **own})
    while not generator.done:
        generator.step()
    return [generator.responses[uid] for uid in range(len(prompts))]
