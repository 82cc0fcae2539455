"""Training data: a folder of JSONL files (train.jsonl, valid.jsonl, test.jsonl) in mlx-lm's forms.

    chat          {"messages": [{"role": ..., "content": ...}, ...]}          (content may list
    tools         {"messages": [...], "tools": [...]}                          image, audio and video
    completions   {"prompt": "...", "completion": "..."}                       items by path)
    text          {"text": "..."}

Chat, tools and completions are rendered with the checkpoint's chat template; with `mask_prompt`
(their default) only the last message, the reply, counts in the loss. Tool turns may come in
OpenAI's form (`tool_calls`, then `role: "tool"` results, then the answer: processing/messages.py);
after tool results only the answer is trained, the calls before them are prompt. Media paths are
relative to the data folder. A bad line is refused with its file, line number and reason, before
any training.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mlx_gemma4u.errors import Gemma4UError, InputError
from mlx_gemma4u.media import ARRAYS, BY_NAME
from mlx_gemma4u.processing.messages import with_tool_turns
from mlx_gemma4u.training.batches import Example

PATH_KEYS = ("path", "url")  # besides the kind's own name ("image": "photo.jpg")


def load_split(
    folder: str | Path,
    split: str,
    processor,
    mask_prompt: bool | None = None,
    max_length: int = 2048,
    image_budget: int | None = None,
):
    """The examples of `folder/<split>.jsonl`, or None if the file is not there. image_budget: soft
    tokens per image at most (the processor's max_soft_tokens; None: the checkpoint's)."""
    file = Path(folder) / f"{split}.jsonl"
    if not file.is_file():
        return None
    examples = []
    with open(file, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise InputError(f"{file}:{number}: not JSON ({error})") from None
            try:
                examples.append(example(record, processor, Path(folder), mask_prompt, max_length, image_budget))
            except (Gemma4UError, OSError, ValueError) as error:
                raise InputError(f"{file}:{number}: {error}") from None
    if not examples:
        raise InputError(f"{file} has no examples.")
    return examples


def example(
    record, processor, folder: Path, mask_prompt: bool | None, max_length: int, image_budget: int | None = None
) -> Example:
    """One JSONL record -> an Example (see the module docstring for the forms)."""
    if not isinstance(record, dict):
        raise InputError("a line must be a JSON object")
    if "messages" in record:
        messages, tools = record["messages"], record.get("tools")
    elif "prompt" in record and "completion" in record:
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]},
        ]
        tools = None
    elif "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            raise InputError('"text" must be a non-empty string')
        ids = processor(text=record["text"], return_tensors="np")["input_ids"][0]
        ids = np.append(ids, processor.tokenizer.eos_token_id)  # text ends, as mlx-lm trains it
        return _fitted(Example(ids, np.zeros_like(ids), 1), max_length)
    else:
        raise InputError('a line needs "messages", "prompt" and "completion", or "text"')
    if not isinstance(messages, list) or len(messages) < 2 or not all(isinstance(m, dict) for m in messages):
        raise InputError('"messages" must be a list of at least two messages (a prompt and its reply)')
    if any(m.get("role") == "tool" for m in messages):
        messages = with_tool_turns(messages)  # OpenAI's form -> the template's
    messages = [_with_local_media(m, folder) for m in messages]
    template = {"tools": tools} if tools else {}
    if image_budget:
        template["processor_kwargs"] = {"images_kwargs": {"max_soft_tokens": image_budget}}
    whole = _render(processor, messages, False, template)
    first = 1
    if mask_prompt is not False:
        prompt = _render(processor, _before_reply(messages), True, template)["input_ids"][0]
        first = _common_prefix(prompt, whole["input_ids"][0])
    ids = whole["input_ids"][0]
    media = {k: v for k, v in whole.items() if k in ARRAYS}
    return _fitted(Example(ids, whole["mm_token_type_ids"][0], first, media), max_length)


def _render(processor, messages: list[dict], generation_prompt: bool, template: dict) -> dict:
    return processor.apply_chat_template(
        messages,
        add_generation_prompt=generation_prompt,
        tokenize=True,
        return_dict=True,
        return_tensors="np",
        **template,
    )


def _before_reply(messages: list[dict]) -> list[dict]:
    """The conversation up to the reply the loss trains: the last message's content; after tool
    calls and their results in the same model turn, just that turn's answer (the results are the
    tools', not the model's)."""
    last = messages[-1]
    return [*messages[:-1], {**last, "content": ""}] if last.get("tool_responses") else messages[:-1]


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.nonzero(a[:n] != b[:n])[0]
    return int(differ[0]) if len(differ) else n


def _with_local_media(message: dict, folder: Path) -> dict:
    """The message with its media items' relative paths made absolute (against the data folder); a
    message of tool calls alone gets the empty content the template expects."""
    content = message.get("content")
    if content is None and message.get("tool_calls"):
        return {**message, "content": ""}
    if not isinstance(content, list):
        return message
    items = []
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind in BY_NAME:
            item = dict(item)
            for key in (kind, *PATH_KEYS):
                value = item.get(key)
                if isinstance(value, str) and "://" not in value:
                    path = (folder / value).resolve()
                    if not path.is_file():
                        raise InputError(f"the {kind} file {value!r} is not in {folder}")
                    item[key] = str(path)
        items.append(item)
    return {**message, "content": items}


def _fitted(e: Example, max_length: int) -> Example:
    """The example cut to max_length tokens; refused if that would cut a media block or leave
    nothing to train on."""
    if e.first_target >= min(len(e), max_length):
        raise InputError(f"it has nothing to train on after its prompt (within --max-seq-length {max_length})")
    if len(e) <= max_length:
        return e
    if e.mm_token_type_ids[max_length:].any():
        raise InputError(f"it is {len(e)} tokens, more than --max-seq-length {max_length}, and its media lie past that")
    return Example(e.input_ids[:max_length], e.mm_token_type_ids[:max_length], e.first_target, e.media)
