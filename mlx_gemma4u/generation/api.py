"""generate, stream_generate, batch_generate: the Python API, each a client of the one engine."""

from __future__ import annotations

from collections.abc import Iterator

from mlx_gemma4u.generation.engine import BatchGenerator, BatchResponse, GenerationResponse
from mlx_gemma4u.generation.inputs import prepare_inputs
from mlx_gemma4u.generation.params import SamplingParams
from mlx_gemma4u.generation.prompt_cache import PromptCache

__all__ = ["generate", "stream_generate", "stream_inputs", "batch_generate", "GenerationResponse", "BatchResponse"]


def stream_generate(
    model,
    processor,
    prompt,
    images=None,
    videos=None,
    audio=None,
    params: SamplingParams | None = None,
    prompt_cache: PromptCache | None = None,
    prefill_step_size: int = 512,
    draft_model=None,
    num_draft_tokens: int | None = None,
    **settings,
) -> Iterator[GenerationResponse]:
    """Stream the reply to `prompt` (a string, token ids or chat messages), one GenerationResponse
    per new token.

    settings: SamplingParams' fields (max_tokens, temperature, top_p, top_k, min_p, seed, the
    penalties, stop, kv_bits, enable_thinking), over `params` if given; any other keyword goes to
    the processor. Stops at an end-of-turn / end-of-sequence id of the checkpoint or a stop string
    (neither shown) or at max_tokens. A PromptCache carries a conversation over turns: each turn
    prefills only what the cache does not hold. draft_model: an MTP assistant (load_draft_model)
    for speculative decoding, num_draft_tokens drafted per round (None: chosen each round from the
    measured acceptance and costs); the output is the same as without it (token for token when
    greedy). A bad prompt or setting raises InputError before any work.
    """
    params, processor_kwargs = SamplingParams.split(settings, params)
    inputs = prepare_inputs(processor, prompt, images, videos, audio, params.enable_thinking, **processor_kwargs)
    yield from stream_inputs(
        model, processor, inputs, params, prompt_cache, prefill_step_size, draft_model, num_draft_tokens
    )


def stream_inputs(
    model,
    processor,
    inputs: dict,
    params: SamplingParams | None = None,
    prompt_cache: PromptCache | None = None,
    prefill_step_size: int = 512,
    draft_model=None,
    num_draft_tokens=None,
) -> Iterator[GenerationResponse]:
    """stream_generate for a prompt already through the processor (prepare_inputs' arrays: ids,
    token types, media). processor None: token ids only, no text, and no stop at end-of-turn ids
    (what a parity run against another implementation wants)."""
    engine = BatchGenerator(model, processor, 1, None, prefill_step_size, draft_model, num_draft_tokens)
    uid = engine.add(inputs, params, prompt_cache)
    while not engine.done:
        for response in engine.step():
            if response.finish_reason == "error":
                raise engine.responses[uid].exception
            yield response


def generate(model, processor, prompt, verbose: bool = False, **kwargs) -> str:
    """The whole reply to `prompt` as one string (see stream_generate for the arguments)."""
    text = ""
    for response in stream_generate(model, processor, prompt, **kwargs):
        text += response.text
        if verbose:
            print(response.text, end="", flush=True)
    return text


def batch_generate(
    model,
    processor,
    prompts: list,
    max_batch: int = 8,
    max_kv_bytes: int | None = None,
    prefill_step_size: int = 512,
    draft_model=None,
    num_draft_tokens: int | None = None,
    **settings,
) -> list[BatchResponse]:
    """The replies to `prompts`, in order, decoded together.

    Each prompt is a prompt as stream_generate takes it, or a dict {"prompt": ..., "images": ...,
    "videos": ..., "audio": ..., "prompt_cache": ..., and any setting}: its settings override the
    shared ones given here. A prompt that fails gets a response with finish_reason "error"; the
    others are unaffected. draft_model / num_draft_tokens: speculative decoding as in
    stream_generate, every row keeping its own accepted length (each response's .draft says how).
    """
    engine = BatchGenerator(model, processor, max_batch, max_kv_bytes, prefill_step_size, draft_model, num_draft_tokens)
    for prompt in prompts:
        own = dict(prompt) if isinstance(prompt, dict) else {"prompt": prompt}
        engine.submit(own.pop("prompt", None), **{**settings, **own})
    while not engine.done:
        engine.step()
    return [engine.responses[uid] for uid in range(len(prompts))]
