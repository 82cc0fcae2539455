"""Chat messages in transformers' content-list format, checked before they reach the template.

    [{"role": "user", "content": "text" | [{"type": "text", "text": ...},
                                           {"type": "image" | "audio" | "video", "path"/"url"/<type>: ...}]}]

A bad message fails here with one sentence naming the message and what is wrong, instead of a
template error or, worse, a prompt that silently drops part of the conversation.

Tool turns come in OpenAI's form (an assistant message with `tool_calls`, then one `role: "tool"`
message per result, by `tool_call_id`, then the assistant's answer) from the server and from
training data; `with_tool_turns` folds them into the one model turn Gemma 4 writes: its
`tool_calls`, their `tool_responses`, then the answer as its content.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from mlx_gemma4u.errors import InputError
from mlx_gemma4u.media import BY_NAME

ROLES = ("system", "developer", "user", "assistant", "model", "tool")
MEDIA_SOURCES = {kind: (kind, "url", "path") for kind in BY_NAME}  # where an item's file or URL may be given


def check_messages(messages: Any) -> None:
    """Raise InputError unless `messages` is a non-empty list of well-formed chat messages."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("Chat messages must be a non-empty list of {'role': ..., 'content': ...} dicts.")
    for i, message in enumerate(messages):
        where = f"Message {i}"
        if not isinstance(message, dict):
            raise InputError(f"{where} must be a dict with 'role' and 'content', got {type(message).__name__}.")
        role = message.get("role")
        if role not in ROLES:
            raise InputError(f"{where} has role {role!r}; use one of {', '.join(ROLES)}.")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, (list, tuple)):
            raise InputError(f"{where} content must be a string or a list of items, got {type(content).__name__}.")
        for j, item in enumerate(content):
            _check_item(item, f"{where}, item {j}")


def _check_item(item: Any, where: str) -> None:
    if not isinstance(item, dict):
        raise InputError(f"{where} must be a dict with a 'type', got {type(item).__name__}.")
    kind = item.get("type")
    if kind == "text":
        if not isinstance(item.get("text"), str):
            raise InputError(f"{where} is a text item without a 'text' string.")
    elif kind in MEDIA_SOURCES:
        if not any(item.get(key) is not None for key in MEDIA_SOURCES[kind]):
            raise InputError(
                f"{where} is an {kind} item without a source; give it "
                f"{' or '.join(repr(k) for k in MEDIA_SOURCES[kind])}."
            )
    else:
        raise InputError(f"{where} has type {kind!r}; use 'text', 'image', 'audio' or 'video'.")


def with_tool_turns(messages: list[dict], content: Callable[[Any, int], Any] | None = None) -> list[dict]:
    """OpenAI-form chat messages -> the template's (see the module docstring); `content(content, i)`
    converts every other message's content (the server reads its media there)."""
    out: list[dict] = []
    names: dict[str, str] = {}  # tool_call_id -> function name
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InputError(f"Message {i} must be an object with a role.")
        role = message["role"]
        if role == "tool":
            attach_tool_response(out, names, message.get("tool_call_id"), text_of(message.get("content"), i), i)
            continue
        body = message.get("content")
        if content is not None:
            body = content(body, i)
        elif body is None:
            body = ""  # a turn of tool calls alone
        if role == "assistant" and _awaits_answer(out) and not message.get("tool_calls"):
            out[-1]["content"] = body  # the answer after the results, in the same model turn
            continue
        converted = {"role": role, "content": body}
        if role == "assistant" and message.get("tool_calls"):
            calls = message["tool_calls"]
            if not isinstance(calls, list):
                raise InputError(f"Message {i} tool_calls must be a list of tool calls.")
            converted["tool_calls"] = [_tool_call(call, names, i) for call in calls]
        out.append(converted)
    return out


def _awaits_answer(out: list[dict]) -> bool:
    last = out[-1] if out else {}
    return last.get("role") == "assistant" and bool(last.get("tool_responses")) and not last.get("content")


def _tool_call(call: Any, names: dict, i: int) -> dict:
    """An OpenAI tool call (arguments as JSON text or an object) -> the template's; notes its id."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise InputError(f"Message {i} has a tool call without a function name.")
    arguments = function.get("arguments") or "{}"
    try:
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        raise InputError(f"Message {i} has a tool call whose arguments are not JSON.") from None
    if not isinstance(arguments, dict):
        raise InputError(f"Message {i} has a tool call whose arguments are not a JSON object.")
    names[str(call.get("id", ""))] = function["name"]
    return {"function": {"name": function["name"], "arguments": arguments}}


def attach_tool_response(out: list[dict], names: dict, call_id: str | None, text: str, i: int) -> None:
    """A tool result joins the model turn that called the tool, as the template expects."""
    if not out or out[-1].get("role") != "assistant" or "tool_calls" not in out[-1]:
        raise InputError(f"Message {i} is a tool result that does not follow an assistant message with tool calls.")
    try:
        response = json.loads(text)
    except ValueError:
        response = text
    out[-1].setdefault("tool_responses", []).append(
        {"name": names.get(str(call_id or ""), "unknown"), "response": response}
    )


def text_of(content: Any, where) -> str:
    """A string, or the text of a list of text blocks."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return "".join(str(b.get("text", "")) for b in content if isinstance(b, dict) and b.get("type") == "text")
    raise InputError(f"Message {where} content must be text.")
