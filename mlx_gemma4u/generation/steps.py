"""The steps every generation takes: prefill a prompt in chunks, then draw each next token.

    prompt ids + media -> embed once -> prefill the tokens the cache does not hold yet, in chunks
    that never cut an image or video-frame block (its tokens see each other both ways, so they
    reach the cache together) -> the last position's logits -> TokenSampler -> a token

Prefill runs only what the caches need for all but the last position (the model cuts the queries
right after the last keys and values), so the last layer's MLP and the 262,144-wide head run for
one position. Sampling and logits processors are mlx-lm's; greedy decoding takes the argmax of the
raw logits and leaves the log-probabilities lazy: they cost a pass over the vocabulary only if read.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import greedy_sampler

from mlx_gemma4u.generation.prompt_cache import PromptCache
from mlx_gemma4u.models.masks import vision_blocks


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


def prefill(
    model, inputs: dict, prompt_cache: PromptCache, prefill_step_size: int = 512, return_hidden: bool = False
) -> mx.array | tuple[mx.array, mx.array]:
    """Run the (1, T) prompt's tokens that the prompt cache does not hold yet -> (1, vocab) logits of the
    last position (and its (1, 1, D) final hidden state if return_hidden: what a drafter starts from);
    the cache then holds the whole prompt (its full-attention layers quantized to its kv_bits).

    inputs: input_ids, optional mm_token_type_ids and media arrays (the processor's output names).
    """
    input_ids = inputs["input_ids"]
    ids = input_ids[0].tolist()
    types = inputs.get("mm_token_type_ids")
    blocks = np.array(vision_blocks(types))[0] if types is not None else np.full(len(ids), -1)
    media = np.nonzero(np.array(types)[0])[0] if types is not None else []
    keys = prompt_cache.media.keys_of(inputs)
    start = prompt_cache.reused = prompt_cache.reusable(ids, blocks, keys, int(media[0]) if len(media) else len(ids))
    prompt_cache.keep(start)
    cache = prompt_cache.caches
    if model.embeds_inputs:
        soft = prompt_cache.media.of(model, inputs, keys)
    else:  # a later pipeline stage: no embedding here, but its cache still records which media it saw
        soft, prompt_cache.media.keys = None, keys
    embeds = model.embed(input_ids, soft_tokens=soft)
    extra = {"return_hidden": True} if return_hidden else {}
    for lo, hi in prefill_chunks(start, len(ids), prefill_step_size, blocks):
        out = model(
            input_ids[:, lo:hi],
            cache=cache,
            inputs_embeds=embeds[:, lo:hi],
            mm_token_type_ids=None if types is None else types[:, lo:hi],
            logits_to_keep=1,
            **extra,
        )
        logits, hidden = out if return_hidden else (out, None)
        if hi < len(ids):  # a split model's chunk ends in collectives that every process must run
            mx.eval([c.state for c in cache], out if model.group is not None else [])
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
