"""OpenAI and Anthropic chat messages -> the chat messages `stream_generate` takes.

Media: images as data: URIs, http(s) URLs or (with --allow-local-files) local paths; audio as
base64 with its format (OpenAI `input_audio`); video as `video_url` / `input_video` (an extension
of ours). Tool turns: an assistant message's `tool_calls` and the tool results that follow it
become one model turn with `tool_calls` and `tool_responses`, the form Gemma 4's template renders.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import tempfile
from pathlib import Path
from typing import Any

from ..errors import InputError


class MediaReader:
    """Turns one request's media references into processor inputs; owns the temporary files of
    inline videos (PyAV reads files), removed by `close`."""

    def __init__(self, allow_local_files: bool):
        self.allow_local_files = allow_local_files
        self._folder: tempfile.TemporaryDirectory | None = None

    def close(self) -> None:
        if self._folder is not None:
            self._folder.cleanup()

    def image(self, url: str) -> dict:
        if url.startswith("data:"):
            from PIL import Image

            try:
                image = Image.open(io.BytesIO(_data_uri(url)))
                image.load()
            except OSError:
                raise InputError("The image data URI does not hold a readable image.") from None
            return {"type": "image", "image": image}
        return {"type": "image", **self._remote_or_local(url, "image")}

    def audio(self, data: str, fmt: str | None) -> dict:
        import soundfile

        try:
            samples, rate = soundfile.read(io.BytesIO(_base64(data, "input_audio.data")), dtype="float32")
        except (RuntimeError, soundfile.LibsndfileError):
            raise InputError(f"input_audio holds no readable {fmt or 'audio'} data.") from None
        return {"type": "audio", "audio": (samples, rate)}

    def video(self, url: str) -> dict:
        if url.startswith("data:"):
            if self._folder is None:
                self._folder = tempfile.TemporaryDirectory(prefix="mlx-gemma4u-video-")
            path = Path(self._folder.name) / f"video-{len(list(Path(self._folder.name).iterdir()))}"
            path.write_bytes(_data_uri(url))
            return {"type": "video", "path": str(path)}
        return {"type": "video", **self._remote_or_local(url, "video")}

    def _remote_or_local(self, url: str, kind: str) -> dict:
        if url.startswith(("http://", "https://")):
            return {"url": url}
        if not self.allow_local_files:
            raise InputError(f"The {kind} must be a data: URI or an http(s) URL; local files are read only when "
                             "the server runs with --allow-local-files.")
        return {"path": url.removeprefix("file://")}


def openai_messages(messages: list[dict], media: MediaReader) -> list[dict]:
    """OpenAI chat messages -> ours (roles system/developer/user/assistant/tool)."""
    out: list[dict] = []
    names: dict[str, str] = {}  # tool_call_id -> function name
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "tool":
            _attach_tool_response(out, names, message.get("tool_call_id"), _text(message.get("content"), i), i)
            continue
        converted = {"role": role, "content": _openai_content(message.get("content"), media, i)}
        if role == "assistant" and message.get("tool_calls"):
            converted["tool_calls"] = [_openai_tool_call(call, names, i) for call in message["tool_calls"]]
        out.append(converted)
    return out


def anthropic_messages(system: Any, messages: list[dict], media: MediaReader) -> list[dict]:
    """Anthropic messages (+ the top-level system prompt) -> ours."""
    out: list[dict] = [{"role": "system", "content": _text(system, "system")}] if system else []
    names: dict[str, str] = {}
    for i, message in enumerate(messages):
        content = message.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
        parts, calls = [], []
        for block in blocks:
            kind = block.get("type")
            if kind == "tool_result":
                _attach_tool_response(out, names, block.get("tool_use_id"), _text(block.get("content"), i), i)
            elif kind == "tool_use":
                names[block.get("id", "")] = block.get("name", "")
                calls.append({"function": {"name": block.get("name"), "arguments": block.get("input") or {}}})
            elif kind == "image":
                parts.append(_anthropic_image(block.get("source") or {}, media, i))
            elif kind == "text":
                parts.append({"type": "text", "text": block.get("text", "")})
            elif kind not in ("thinking", "redacted_thinking"):
                raise InputError(f"Message {i} has a content block of type {kind!r}, which this server does not read.")
        if parts or calls or not blocks:
            converted = {"role": message.get("role"), "content": parts}
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
            raise InputError(f"Message {i} has a content part of type {kind!r}; use text, image_url, "
                             "input_audio or video_url.")
    return parts


def _openai_tool_call(call: dict, names: dict, i: int) -> dict:
    function = call.get("function") or {}
    arguments = function.get("arguments") or "{}"
    try:
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        raise InputError(f"Message {i} has a tool call whose arguments are not JSON.") from None
    names[call.get("id", "")] = function.get("name", "")
    return {"function": {"name": function.get("name"), "arguments": arguments}}


def _attach_tool_response(out: list[dict], names: dict, call_id: str | None, text: str, i: int) -> None:
    """A tool result joins the model turn that called the tool, as the template expects."""
    if not out or out[-1].get("role") != "assistant" or "tool_calls" not in out[-1]:
        raise InputError(f"Message {i} is a tool result that does not follow an assistant message with tool calls.")
    try:
        response = json.loads(text)
    except ValueError:
        response = text
    out[-1].setdefault("tool_responses", []).append({"name": names.get(call_id or "", "unknown"),
                                                     "response": response})


def _anthropic_image(source: dict, media: MediaReader, i: int) -> dict:
    if source.get("type") == "base64":
        return media.image(f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}")
    if source.get("type") == "url":
        return media.image(str(source.get("url", "")))
    raise InputError(f"Message {i} has an image source of type {source.get('type')!r}; use base64 or url.")


def _text(content: Any, where) -> str:
    """A string, or the text of a list of text blocks."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return "".join(str(b.get("text", "")) for b in content if isinstance(b, dict) and b.get("type") == "text")
    raise InputError(f"Message {where} content must be text.")


def _url(value: Any, i: int) -> str:
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise InputError(f"Message {i} has a media part without a url.")
    return url


def _data_uri(uri: str) -> bytes:
    header, _, data = uri.partition(",")
    if ";base64" not in header:
        raise InputError("Media data URIs must be base64 encoded (data:<type>;base64,...).")
    return _base64(data, "the data URI")


def _base64(data: str, what: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{what} is not valid base64.") from None
