"""The generation loop: prefill in chunks, then decode one token per step with the caches.

    prompt + media -> processor -> ids, soft-token inputs -> embed once -> prefill the tokens the
    cache does not hold yet, in chunks -> last position's logits -> sample -> decode steps ...
    (each next step is queued while the current token is handed out)

Sampling and logits processors are mlx-lm's; streaming detokenization is mlx-lm's too, so a
multi-byte character is never cut in half. Prefill runs only what the caches need for all but the
last position (the model cuts the queries right after the last keys and values; see
decoder.TextModel), so the last layer's MLP and the 262,144-wide head run for one position; a chunk
never ends inside an image or video-frame block (the block's tokens see each other both ways, so
they must reach the cache together). Greedy decoding takes the argmax of the raw logits and leaves
each step's log-probabilities lazy: they cost a pass over the vocabulary only if someone reads them.
speculative.py (decoding with a drafter) and batch.py (many sequences at once) build on prefill,
decode and TokenSampler.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import greedy_sampler, make_logits_processors, make_sampler

from mlx_gemma4u.models.cache import MEDIA, PromptCache
from mlx_gemma4u.errors import InputError
from mlx_gemma4u.generation.reply import ReplyText
from mlx_gemma4u.models.masks import vision_blocks

MEDIA_KEYS = tuple(name for names in MEDIA.values() for name in names)


@dataclass
class GenerationResponse:
    """One streamed step: the new text segment and the running statistics."""

    text: str
    token: int | None
    logprobs: mx.array | None
    prompt_tokens: int
    prefilled_tokens: int  # prompt tokens actually run (the rest came from the prompt cache)
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: str | None = None
    from_draft: bool = False  # the token was drafted (and accepted), not the target's own next token
    draft: "DraftStats | None" = None  # with a draft model: the reply's drafting so far (speculative.py)


def prefill_chunks(start: int, n_tokens: int, step_size: int, blocks: np.ndarray) -> list[tuple[int, int]]:
    """Split [start, n_tokens) into chunks of about step_size that never cut a vision block."""
    chunks = []
    while start < n_tokens:
        end = min(start + step_size, n_tokens)
        while end < n_tokens and blocks[end] >= 0 and blocks[end] == blocks[end - 1]:
            end += 1
        chunks.append((start, end))
        start = end
    return chunks


def prefill(model, inputs: dict, prompt_cache: PromptCache, prefill_step_size: int = 512,
            return_hidden: bool = False) -> mx.array | tuple[mx.array, mx.array]:
    """Run the (1, T) prompt's tokens that the prompt cache does not hold yet -> (1, vocab) logits of the
    last position (and its (1, 1, D) final hidden state if return_hidden: what a drafter starts from);
    the cache then holds the whole prompt (its full-attention layers quantized to its kv_bits).

    inputs: input_ids, optional mm_token_type_ids and media arrays (the processor's output names).
    """
    input_ids = inputs["input_ids"]
    ids = input_ids[0].tolist()
    types = inputs.get("mm_token_type_ids")
    blocks = np.array(vision_blocks(types))[0] if types is not None else np.full(len(ids), -1)
    start = prompt_cache.reused = prompt_cache.reusable(ids, blocks)
    prompt_cache.keep(start)
    cache = prompt_cache.caches
    embeds = model.embed(input_ids, soft_tokens=prompt_cache.media.of(model, inputs))
    extra = {"return_hidden": True} if return_hidden else {}
    for lo, hi in prefill_chunks(start, len(ids), prefill_step_size, blocks):
        out = model(input_ids[:, lo:hi], cache=cache, inputs_embeds=embeds[:, lo:hi],
                    mm_token_type_ids=None if types is None else types[:, lo:hi], logits_to_keep=1, **extra)
        logits, hidden = out if return_hidden else (out, None)
        if hi < len(ids):
            mx.eval([c.state for c in cache])
    prompt_cache.quantize()
    prompt_cache.tokens = list(ids)
    return (logits[:, -1], hidden[:, -1:]) if return_hidden else logits[:, -1]


class TokenSampler:
    """One sequence's next token from its logits: its logits processors (over its history), then its sampler.

    seed: draw from the sequence's own random stream, the one `mx.random.seed(seed)` starts, so a
    sequence sampled among others (batch.py) draws exactly what it draws alone; None: the global stream.
    """

    def __init__(self, sampler: Callable, processors: list | None, history: mx.array, seed: int | None = None):
        self.sampler, self.processors, self.history = sampler, processors or [], history
        self.key = None if seed is None else mx.random.key(seed)

    def __call__(self, logits: mx.array) -> tuple[mx.array, mx.array]:
        """(1, vocab) logits in the model's dtype -> the (1,) token and the (vocab,) float32 log-probabilities."""
        if self.processors:
            logits = logits.astype(mx.float32)
        for process in self.processors:
            logits = process(self.history, logits)
        scores = logits.astype(mx.float32)
        logprobs = scores - mx.logsumexp(scores, axis=-1, keepdims=True)
        # The argmax of the logits is the argmax of the log-probabilities, which then stay unevaluated.
        if self.sampler is greedy_sampler:
            token = mx.argmax(logits, axis=-1)
        else:
            token = self.sampler(logprobs) if self.key is None else self._draw_own(logprobs)
        if self.processors:  # only they read the history, and growing it costs a copy per token
            self.history = mx.concatenate([self.history, token])
        return token, logprobs[0]

    def _draw_own(self, logprobs: mx.array) -> mx.array:
        """The sampler's draw with this sequence's key as the global random state, restored after
        (mx.random.seed(n) makes the state the key [n >> 32, n & 0xffffffff], so any key can be put back)."""
        outer = _key_number(mx.random.state[0])
        mx.random.seed(_key_number(self.key))
        token = self.sampler(logprobs)
        self.key = mx.random.state[0]
        mx.random.seed(outer)
        return token


def _key_number(key: mx.array) -> int:
    high, low = key.tolist()
    return (high << 32) | low


def generate_step(
    model,
    inputs: dict,
    prompt_cache: PromptCache,
    sampler: Callable,
    logits_processors: list | None = None,
    max_tokens: int = 256,
    prefill_step_size: int = 512,
) -> Iterator[tuple[int, mx.array]]:
    """Yield (token, logprobs) for up to max_tokens new tokens after the (1, T) prompt in `inputs`.

    inputs: input_ids, optional mm_token_type_ids and media arrays (the processor's output names).
    Tokens the prompt cache already holds are not prefilled again; the rest are.
    """
    sample = TokenSampler(sampler, logits_processors, inputs["input_ids"][0])
    token, logprobs = sample(prefill(model, inputs, prompt_cache, prefill_step_size))
    steps = decode(model, sample, prompt_cache, token, logprobs, max_tokens)
    try:
        for value, logprobs, _ in steps:
            yield value, logprobs
    finally:
        steps.close()


def decode(model, sample: TokenSampler, prompt_cache: PromptCache, token: mx.array, logprobs: mx.array,
           count: int, hidden: mx.array | None = None) -> Iterator[tuple[int, mx.array, mx.array | None]]:
    """Yield `token` ((1,), drawn but not in the caches yet) and the count - 1 tokens after it, one
    target step each, every next step queued before the current token is handed out.

    Each item: (id, logprobs, the (1, 1, D) final hidden state that predicted it), the hidden states
    only if `hidden` (the one that predicted `token`) is given: what a drafter resumes from. Every
    token handed out but the last is in the caches and PromptCache.tokens, even if the caller stops.
    """
    cache = prompt_cache.caches  # after prefill: the caches it quantized, if kv_bits is set
    with_hidden = hidden is not None
    mx.async_eval(token)
    for n in range(count):
        more = n + 1 < count
        if more:
            out = model(token[None], cache=cache, logits_to_keep=1, return_hidden=with_hidden)
            logits, next_hidden = out if with_hidden else (out, None)
            next_token, next_logprobs = sample(logits[:, -1])
            mx.async_eval(next_token)
        value = token.item()
        try:
            yield value, logprobs, hidden
        finally:  # the token just handed out is in the cache now, even if the caller stops here
            if more:
                prompt_cache.tokens.append(value)
        if more:
            token, logprobs, hidden = next_token, next_logprobs, next_hidden


def prepare_inputs(processor, prompt, images=None, videos=None, audio=None, enable_thinking: bool = False,
                   **processor_kwargs) -> dict[str, mx.array]:
    """The processor's arrays for one prompt (batch of 1) as MLX arrays: see prepare_arrays."""
    arrays = prepare_arrays(processor, prompt, images, videos, audio, enable_thinking, **processor_kwargs)
    return {k: mx.array(v) for k, v in arrays.items()}


def prepare_arrays(processor, prompt, images=None, videos=None, audio=None, enable_thinking: bool = False,
                   tools: list[dict] | None = None, **processor_kwargs) -> dict[str, np.ndarray]:
    """The processor's arrays for one prompt (batch of 1), with the BOS token exactly once, as
    numpy arrays: no MLX work, so any thread may prepare a prompt that another one generates from.

    A list of token ids is used as is; a string verbatim (its <|image|>, <|audio|>, <|video|>
    placeholders are expanded, its special-token strings are those tokens); chat messages go
    through the chat template with the generation prompt (and `tools`), their text staying text,
    and media passed beside them join the last user message.
    """
    media = {"images": images, "videos": videos, "audio": audio}
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
        if any(media.values()):
            raise InputError("A prompt of token ids cannot take media; pass a string or chat messages.")
        inputs = {"input_ids": np.array([list(prompt)], dtype=np.int64)}
    elif isinstance(prompt, str):
        if not prompt:
            raise InputError("The prompt is empty.")
        inputs = processor(text=prompt, return_tensors="np", add_special_tokens=False, **media, **processor_kwargs)
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        messages = _attach_media(list(prompt), media)
        template = {"tools": tools} if tools else {}
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="np", enable_thinking=enable_thinking,
                                               processor_kwargs=processor_kwargs, **template)
    else:
        raise InputError("prompt must be a non-empty string, list of token ids, or list of chat messages (dicts).")
    inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "mm_token_type_ids", *MEDIA_KEYS)}
    return _with_bos(inputs, processor.tokenizer.bos_token_id)


def _attach_media(messages: list[dict], media: dict) -> list[dict]:
    items = [{"type": kind.rstrip("s"), kind.rstrip("s"): item}
             for kind, value in media.items() if value is not None
             for item in (value if isinstance(value, list) else [value])]
    if not items:
        return messages
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise InputError("Media need a user message to go with.")
    last = dict(messages[users[-1]])
    content = last.get("content")
    text = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
    last["content"] = items + text
    return [*messages[:users[-1]], last, *messages[users[-1] + 1:]]


def _with_bos(inputs: dict, bos: int) -> dict:
    ids = inputs["input_ids"].astype(np.int32)
    if ids.shape[1] and ids[0, 0] == bos:
        return {**inputs, "input_ids": ids}
    out = {**inputs, "input_ids": np.concatenate([np.array([[bos]], dtype=np.int32), ids], axis=1)}
    if "mm_token_type_ids" in inputs:
        types = inputs["mm_token_type_ids"]
        out["mm_token_type_ids"] = np.concatenate([np.zeros((1, 1), dtype=types.dtype), types], axis=1)
    return out


def stream_generate(
    model,
    processor,
    prompt,
    images=None,
    videos=None,
    audio=None,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
    repetition_penalty: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    stop: list[str] | None = None,
    prompt_cache: PromptCache | None = None,
    kv_bits: int | None = None,
    prefill_step_size: int = 512,
    enable_thinking: bool = False,
    draft_model=None,
    num_draft_tokens: int | None = None,
    **processor_kwargs,
) -> Iterator[GenerationResponse]:
    """Stream the reply to `prompt`, one GenerationResponse per new token.

    Stops at any end-of-turn / end-of-sequence id of the checkpoint (never printed), at a stop
    string (not printed either) or at max_tokens. Pass a PromptCache to carry a conversation over
    turns: each turn then prefills only what the cache does not hold. draft_model: an MTP assistant
    (load_draft_model) for speculative decoding, num_draft_tokens tokens drafted per round (None:
    chosen each round from the measured acceptance and costs, see speculative.DraftLength); the
    output is the same as without it (token for token when greedy).
    """
    check_settings(max_tokens, temperature, top_p, top_k, min_p, seed, repetition_penalty, presence_penalty,
                   frequency_penalty, stop, kv_bits)
    if seed is not None:
        mx.random.seed(seed)
    tokenizer = processor.tokenizer
    inputs = prepare_inputs(processor, prompt, images, videos, audio, enable_thinking, **processor_kwargs)
    prompt_cache = prompt_cache if prompt_cache is not None else PromptCache(model, kv_bits)
    sampler = make_sampler(temp=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
    processors = make_logits_processors(repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                                        frequency_penalty=frequency_penalty)
    reply = ReplyText(tokenizer, stop)
    n_prompt = inputs["input_ids"].shape[1]
    check_context(model, n_prompt, max_tokens)
    start = time.perf_counter()
    stats = None
    if draft_model is None:
        steps = generate_step(model, inputs, prompt_cache, sampler, processors, max_tokens, prefill_step_size)
    else:
        from mlx_gemma4u.generation.speculative import DraftStats, speculative_step  # it builds on this module

        stats = DraftStats()
        steps = speculative_step(model, draft_model, inputs, prompt_cache, sampler, processors, max_tokens,
                                 prefill_step_size, num_draft_tokens, stats)
    prompt_time = gen_start = None
    for n, (token, logprobs, *drafted) in enumerate(steps, start=1):
        if gen_start is None:
            prompt_time, gen_start = time.perf_counter() - start, time.perf_counter()
            prefilled = n_prompt - prompt_cache.reused
        segment, finish = reply.add(token, last=n == max_tokens)
        yield GenerationResponse(
            text=segment, token=token, logprobs=logprobs, prompt_tokens=n_prompt, prefilled_tokens=prefilled,
            prompt_tps=prefilled / max(prompt_time, 1e-9), generation_tokens=n,
            generation_tps=n / max(time.perf_counter() - gen_start, 1e-9),
            peak_memory=mx.get_peak_memory() / 1e9, finish_reason=finish, from_draft=bool(drafted and drafted[0]),
            draft=stats,
        )
        if finish:
            break


def check_context(model, n_prompt: int, max_tokens: int) -> None:
    """Refuse a prompt whose tokens plus max_tokens do not fit the model's context."""
    context = model.config.text.max_position_embeddings
    if n_prompt + max_tokens > context:
        raise InputError(f"The prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                         f"context of {context} tokens; shorten the prompt or lower max_tokens.")


def generate(model, processor, prompt, verbose: bool = False, **kwargs) -> str:
    """The whole reply to `prompt` as one string (see stream_generate for the arguments)."""
    text = ""
    for response in stream_generate(model, processor, prompt, **kwargs):
        text += response.text
        if verbose:
            print(response.text, end="", flush=True)
    return text


SEEDS = range(2**64)  # the seeds mx.random.key takes
PENALTIES = {"repetition_penalty": (0.1, 10.0), "presence_penalty": (-2.0, 2.0), "frequency_penalty": (-2.0, 2.0)}


def check_settings(max_tokens=256, temperature=0.0, top_p=0.0, top_k=0, min_p=0.0, seed=None, repetition_penalty=None,
                   presence_penalty=None, frequency_penalty=None, stop=None, kv_bits=None) -> None:
    """Refuse, in one sentence, a generation setting the engine cannot use: the one check of them
    all, made before any work starts (by stream_generate, BatchGenerator.submit and the server)."""
    if not _whole(max_tokens) or max_tokens < 1:
        raise InputError(f"max_tokens must be a positive integer, got {max_tokens!r}.")
    for name, value in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p)):
        if not _number(value):
            raise InputError(f"{name} must be a finite number, got {value!r}.")
    if temperature < 0:
        raise InputError(f"temperature must be 0 (greedy) or more, got {temperature}.")
    if not 0 <= top_p <= 1:
        raise InputError(f"top_p must be in [0, 1] (0 turns it off), got {top_p}.")
    if not _whole(top_k) or top_k < 0:
        raise InputError(f"top_k must be 0 (off) or a positive integer, got {top_k!r}.")
    if not 0 <= min_p < 1:
        raise InputError(f"min_p must be in [0, 1), got {min_p}.")
    if seed is not None and not (_whole(seed) and seed in SEEDS):
        raise InputError(f"seed must be a whole number from 0 to 2**64 - 1, got {seed!r}.")
    given = {"repetition_penalty": repetition_penalty, "presence_penalty": presence_penalty,
             "frequency_penalty": frequency_penalty}
    for name, value in given.items():
        low, high = PENALTIES[name]
        if value is not None and not (_number(value) and low <= value <= high):
            raise InputError(f"{name} must be a number from {low:g} to {high:g} (or unset), got {value!r}.")
    if stop is not None and not (isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop)):
        raise InputError(f"stop must be a list of strings, got {stop!r}.")
    if kv_bits not in (None, 4, 8):
        raise InputError(f"kv_bits must be 4 or 8 (or unset), got {kv_bits!r}.")


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
