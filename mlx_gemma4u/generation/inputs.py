"""A prompt in any form the API takes -> the processor's arrays, with the BOS token exactly once.

The numpy form (prepare_arrays) does no MLX work, so any thread may prepare a prompt that another
one generates from (the server prepares on a pool, the engine runs on its own thread).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_gemma4u.errors import InputError
from mlx_gemma4u.media import ARRAYS, KINDS


def prepare_inputs(
    processor, prompt, images=None, videos=None, audio=None, enable_thinking: bool = False, **processor_kwargs
) -> dict[str, mx.array]:
    """The processor's arrays for one prompt (batch of 1) as MLX arrays: see prepare_arrays."""
    arrays = prepare_arrays(processor, prompt, images, videos, audio, enable_thinking, **processor_kwargs)
    return {k: mx.array(v) for k, v in arrays.items()}


def prepare_arrays(
    processor,
    prompt,
    images=None,
    videos=None,
    audio=None,
    enable_thinking: bool = False,
    tools: list[dict] | None = None,
    **processor_kwargs,
) -> dict[str, np.ndarray]:
    """The processor's arrays for one prompt (batch of 1), with the BOS token exactly once, as
    numpy arrays: no MLX work, so any thread may prepare a prompt that another one generates from.

    A list of token ids is used as is; a string verbatim (its <|image|>, <|audio|>, <|video|>
    placeholders are expanded, its special-token strings are those tokens); chat messages go
    through the chat template with the generation prompt (and `tools`), their text staying text,
    and media passed beside them join the last user message.
    """
    media = dict(zip((kind.keyword for kind in KINDS), (images, videos, audio)))
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
        inputs = processor.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="np",
            enable_thinking=enable_thinking,
            processor_kwargs=processor_kwargs,
            **template,
        )
    else:
        raise InputError("prompt must be a non-empty string, list of token ids, or list of chat messages (dicts).")
    inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "mm_token_type_ids", *ARRAYS)}
    return _with_bos(inputs, processor.tokenizer.bos_token_id)


def _attach_media(messages: list[dict], media: dict) -> list[dict]:
    items = [
        {"type": kind.name, kind.name: item}
        for kind in KINDS
        if (value := media[kind.keyword]) is not None
        for item in (value if isinstance(value, list) else [value])
    ]
    if not items:
        return messages
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise InputError("Media need a user message to go with.")
    last = dict(messages[users[-1]])
    content = last.get("content")
    text = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
    last["content"] = items + text
    return [*messages[: users[-1]], last, *messages[users[-1] + 1 :]]


def _with_bos(inputs: dict, bos: int) -> dict:
    ids = inputs["input_ids"].astype(np.int32)
    if ids.shape[1] and ids[0, 0] == bos:
        return {**inputs, "input_ids": ids}
    out = {**inputs, "input_ids": np.concatenate([np.array([[bos]], dtype=np.int32), ids], axis=1)}
    if "mm_token_type_ids" in inputs:
        types = inputs["mm_token_type_ids"]
        out["mm_token_type_ids"] = np.concatenate([np.zeros((1, 1), dtype=types.dtype), types], axis=1)
    return out


def check_context(model, n_prompt: int, max_tokens: int) -> None:
    """Refuse a prompt whose tokens plus max_tokens do not fit the model's context."""
    context = model.config.text.max_position_embeddings
    if n_prompt + max_tokens > context:
        raise InputError(
            f"The prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
            f"context of {context} tokens; shorten the prompt or lower max_tokens."
        )
