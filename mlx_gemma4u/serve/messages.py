"""OpenAI and Anthropic chat messages, and OpenAI Responses input items -> the chat messages
`stream_generate` takes.

Media: images as data: URIs, http(s) URLs or (with --allow-local-files) local paths; audio as
base64 with its format (OpenAI `input_audio`); video as `video_url` / `input_video` (an extension
of ours). Tool turns: an assistant message's `tool_calls` and the tool results that follow it
become one model turn with `tool_calls` and `tool_responses`, the form Gemma 4's template renders.
"""

from __future__ import annotations

from typing import Any

from mlx_gemma4u.errors import InputError
from mlx_gemma4u.processing.messages import attach_tool_response, text_of, with_tool_turns
from mlx_gemma4u.serve.media import MediaReader


def openai_messages(messages: list[dict], media: MediaReader) -> list[dict]:
    """OpenAI chat messages -> ours (roles system/developer/user/assistant/tool)."""
    return with_tool_turns(messages, lambda content, i: _openai_content(content, media, i))


def responses_messages(instructions: str | None, items: list[dict], media: MediaReader) -> list[dict]:
    """OpenAI Responses input items (messages, function_call, function_call_output; reasoning items
    are left out, as Gemma 4's template leaves earlier thoughts out) -> ours, through their chat form."""
    chat: list[dict] = [{"role": "system", "content": instructions}] if instructions else []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise InputError(f"Input item {i} must be an object.")
        kind = item.get("type", "message")
        if kind == "message":
            content = item.get("content")
            parts = [_chat_part(part, i) for part in content] if isinstance(content, list) else content
            chat.append({"role": item.get("role"), "content": parts})
        elif kind == "function_call":
            function = {"name": item.get("name"), "arguments": item.get("arguments")}
            call = {"id": item.get("call_id"), "function": function}
            if chat and chat[-1]["role"] == "assistant":  # the calls of one model turn
                chat[-1].setdefault("tool_calls", []).append(call)
            else:
                chat.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            chat.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": item.get("output")})
        elif kind != "reasoning":
            raise InputError(
                f"Input item {i} is of type {kind!r}; use message, function_call, function_call_output or reasoning."
            )
    return openai_messages(chat, media)


def _chat_part(part: Any, i: int) -> Any:
    """A Responses content part -> the chat part of the same content."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text", "refusal"):
        return {"type": "text", "text": part.get("text", part.get("refusal", ""))}
    if kind == "input_image":
        return {"type": "image_url", "image_url": {"url": part.get("image_url")}}
    if kind == "input_video":
        return {"type": "video_url", "video_url": {"url": part.get("video_url")}}
    if kind == "input_audio":
        return part
    raise InputError(
        f"Input item {i} has a content part of type {kind!r}; use input_text, input_image, input_audio or input_video."
    )


def anthropic_messages(system: Any, messages: list[dict], media: MediaReader) -> list[dict]:
    """Anthropic messages (+ the top-level system prompt) -> ours."""
    out: list[dict] = [{"role": "system", "content": text_of(system, "system")}] if system else []
    names: dict[str, str] = {}
    for i, message in enumerate(messages):
        role, content = _role(message, i), message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise InputError(f"Message {i} content must be a string or a list of content blocks.")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
        parts, calls = [], []
        for block in blocks:
            if not isinstance(block, dict):
                raise InputError(f"Message {i} has a content block that is not an object.")
            kind = block.get("type")
            if kind == "tool_result":
                attach_tool_response(out, names, block.get("tool_use_id"), text_of(block.get("content"), i), i)
            elif kind == "tool_use":
                calls.append(_anthropic_tool_use(block, names, i))
            elif kind == "image":
                parts.append(_anthropic_image(block.get("source") or {}, media, i))
            elif kind == "text":
                parts.append({"type": "text", "text": text_of(block.get("text"), i)})
            elif kind not in ("thinking", "redacted_thinking"):
                raise InputError(f"Message {i} has a content block of type {kind!r}, which this server does not read.")
        if parts or calls or not blocks:
            converted = {"role": role, "content": parts}
            if calls:
                converted["tool_calls"] = calls
            out.append(converted)
    return out


def _openai_content(content: Any, media: MediaReader, i: int) -> str | list:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise InputError(f"Message {i} content must be a string or a list of content parts.")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind == "image_url":
            parts.append(media.image(_url(part.get("image_url"), i)))
        elif kind == "input_audio":
            audio = part.get("input_audio") or {}
            parts.append(media.audio(audio.get("data", ""), audio.get("format")))
        elif kind in ("video_url", "input_video"):
            parts.append(media.video(_url(part.get(kind), i)))
        else:
            raise InputError(
                f"Message {i} has a content part of type {kind!r}; use text, image_url, input_audio or video_url."
            )
    return parts


def _anthropic_tool_use(block: dict, names: dict, i: int) -> dict:
    name, arguments = block.get("name"), block.get("input") or {}
    if not isinstance(name, str) or not isinstance(arguments, dict):
        raise InputError(f"Message {i} has a tool_use block without a name or whose input is not an object.")
    names[str(block.get("id", ""))] = name
    return {"function": {"name": name, "arguments": arguments}}


def _anthropic_image(source: Any, media: MediaReader, i: int) -> dict:
    if not isinstance(source, dict):
        raise InputError(f"Message {i} has an image block whose source is not an object.")
    if source.get("type") == "base64":
        return media.image(f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}")
    if source.get("type") == "url":
        return media.image(str(source.get("url", "")))
    raise InputError(f"Message {i} has an image source of type {source.get('type')!r}; use base64 or url.")


def _role(message: Any, i: int) -> str:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise InputError(f"Message {i} must be an object with a role.")
    return message["role"]


def _url(value: Any, i: int) -> str:
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise InputError(f"Message {i} has a media part without a url.")
    return url
