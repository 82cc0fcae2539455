"""Chat messages in transformers' content-list format, checked before they reach the template.

    [{"role": "user", "content": "text" | [{"type": "text", "text": ...},
                                           {"type": "image" | "audio" | "video", "path"/"url"/<type>: ...}]}]

A bad message fails here with one sentence naming the message and what is wrong, instead of a
template error or, worse, a prompt that silently drops part of the conversation.
"""

from __future__ import annotations

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
