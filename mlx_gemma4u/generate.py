"""The generation loop: prefill in chunks, then decode one token per step with the caches.

    prompt -> ids (+ media) -> embed once -> prefill chunks -> last position's logits -> sample
           -> decode step ... (the next step is queued while the current token is handed out)

Sampling and logits processors are mlx-lm's; streaming detokenization is mlx-lm's too, so a
multi-byte character is never cut in half. Prefill runs the 262,144-wide output head for the last
position only, and a chunk never ends inside an image or video-frame block (the block's tokens
see each other both ways, so they must be in the cache together).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .errors import InputError
from .masks import vision_blocks


@dataclass
class GenerationResponse:
    """One streamed step: the new text segment and the running statistics."""

    text: str
    token: int | None
    logprobs: mx.array | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: str | None = None


def prefill_chunks(n_tokens: int, step_size: int, mm_token_type_ids: mx.array | None = None) -> list[tuple[int, int]]:
    """Split [0, n_tokens) into chunks of about step_size that never cut a vision block."""
    blocks = np.array(vision_blocks(mm_token_type_ids))[0] if mm_token_type_ids is not None else None
    chunks, start = [], 0
    while start < n_tokens:
        end = min(start + step_size, n_tokens)
        while blocks is not None and 0 < end < n_tokens and blocks[end] >= 0 and blocks[end] == blocks[end - 1]:
            end += 1
        chunks.append((start, end))
        start = end
    return chunks


def generate_step(
    model,
    input_ids: mx.array,
    cache: list,
    sampler: Callable,
    logits_processors: list | None = None,
    max_tokens: int = 256,
    prefill_step_size: int = 512,
    mm_token_type_ids: mx.array | None = None,
    **media,
) -> Iterator[tuple[int, mx.array]]:
    """Yield (token, logprobs) for up to max_tokens new tokens after the (1, T) prompt `input_ids`."""
    history = input_ids[0]
    processors = logits_processors or []

    def sample(logits: mx.array):
        nonlocal history
        for process in processors:
            logits = process(history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = sampler(logprobs)
        history = mx.concatenate([history, token])
        return token, logprobs[0]

    embeds = model.embed(input_ids, **media)
    for start, end in prefill_chunks(input_ids.shape[1], prefill_step_size, mm_token_type_ids):
        types = mm_token_type_ids[:, start:end] if mm_token_type_ids is not None else None
        logits = model(input_ids[:, start:end], cache=cache, inputs_embeds=embeds[:, start:end],
                       mm_token_type_ids=types, logits_to_keep=1)
        if end < input_ids.shape[1]:
            mx.eval([c.state for c in cache])
    token, logprobs = sample(logits[:, -1].astype(mx.float32))
    mx.async_eval(token, logprobs)
    for n in range(max_tokens):
        if n + 1 < max_tokens:
            logits = model(token[None], cache=cache, logits_to_keep=1)
            next_token, next_logprobs = sample(logits[:, -1].astype(mx.float32))
            mx.async_eval(next_token, next_logprobs)
        yield token.item(), logprobs
        if n + 1 < max_tokens:
            token, logprobs = next_token, next_logprobs


def prompt_ids(tokenizer, prompt, enable_thinking: bool = False) -> list[int]:
    """A token list as is; a string verbatim; chat messages through the chat template. BOS exactly once."""
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        ids = list(prompt)
    elif isinstance(prompt, str):
        ids = tokenizer.encode(prompt, add_special_tokens=False)
    elif isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt):
        ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True,
                                            enable_thinking=enable_thinking)
    else:
        raise InputError("prompt must be a string, a list of token ids, or a list of chat messages (dicts).")
    if not ids:
        raise InputError("The prompt is empty.")
    bos = tokenizer.bos_token_id
    return ids if ids[0] == bos else [bos, *ids]


def stream_generate(
    model,
    processor,
    prompt,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
    repetition_penalty: float | None = None,
    prefill_step_size: int = 512,
    enable_thinking: bool = False,
) -> Iterator[GenerationResponse]:
    """Stream the reply to `prompt`, one GenerationResponse per new token.

    Stops at any end-of-turn / end-of-sequence id of the checkpoint (never printed) or max_tokens.
    """
    _check_sampling(max_tokens, temperature, top_p, top_k, min_p)
    tokenizer = getattr(processor, "tokenizer", processor)
    if seed is not None:
        mx.random.seed(seed)
    ids = prompt_ids(tokenizer, prompt, enable_thinking)
    sampler = make_sampler(temp=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
    processors = make_logits_processors(repetition_penalty=repetition_penalty)
    stops = set(tokenizer.eos_token_ids)
    hidden = set(getattr(tokenizer, "all_special_ids", ())) | stops
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()

    start = time.perf_counter()
    steps = generate_step(model, mx.array([ids], dtype=mx.int32), model.make_cache(), sampler, processors,
                          max_tokens=max_tokens, prefill_step_size=prefill_step_size)
    prompt_time = gen_start = None
    n = 0
    for n, (token, logprobs) in enumerate(steps, start=1):
        if gen_start is None:
            prompt_time = time.perf_counter() - start
            gen_start = time.perf_counter()
        if token not in hidden:
            detokenizer.add_token(token)
        finish = "stop" if token in stops else "length" if n == max_tokens else None
        if finish:
            detokenizer.finalize()
        elapsed = max(time.perf_counter() - gen_start, 1e-9)
        yield GenerationResponse(
            text=detokenizer.last_segment, token=token, logprobs=logprobs,
            prompt_tokens=len(ids), prompt_tps=len(ids) / max(prompt_time, 1e-9),
            generation_tokens=n, generation_tps=n / elapsed,
            peak_memory=mx.get_peak_memory() / 1e9, finish_reason=finish,
        )
        if finish:
            break


def generate(model, processor, prompt, verbose: bool = False, **kwargs) -> str:
    """The whole reply to `prompt` as one string (see stream_generate for the arguments)."""
    text = ""
    for response in stream_generate(model, processor, prompt, **kwargs):
        text += response.text
        if verbose:
            print(response.text, end="", flush=True)
    return text


def _check_sampling(max_tokens, temperature, top_p, top_k, min_p) -> None:
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise InputError(f"max_tokens must be a positive integer, got {max_tokens!r}.")
    if temperature < 0:
        raise InputError(f"temperature must be 0 (greedy) or more, got {temperature}.")
    if not 0 <= top_p <= 1:
        raise InputError(f"top_p must be in (0, 1] (0 turns it off), got {top_p}.")
    if top_k < 0:
        raise InputError(f"top_k must be 0 (off) or a positive integer, got {top_k}.")
    if not 0 <= min_p < 1:
        raise InputError(f"min_p must be in [0, 1), got {min_p}.")
