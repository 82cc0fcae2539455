"""Render a checkpoint's Jinja chat template the way transformers does.

transformers compiles templates in jinja2's immutable sandbox with trim_blocks and lstrip_blocks,
the loopcontrols extension, a `tojson` that keeps non-ASCII text, and the helpers
`raise_exception` and `strftime_now`. The template also sees the tokenizer's special tokens
(`bos_token`, ...) and the caller's extra keywords (for example `enable_thinking`).
Message values that are not plain JSON data (decoded images, arrays) are shown to the template
as an inert "<TypeName>" string, since templates only test whether a media key is present.

For tokenizing, `render_chat_text` renders with the special-token strings of the messages' text
escaped (TextEscapes), so the prompt's control tokens are the template's alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mlx_gemma4u.errors import InputError
from mlx_gemma4u.processing.messages import MEDIA_SOURCES
from mlx_gemma4u.processing.text import TextEscapes

MODEL_ROLES = ("assistant", "model")


def default_template(template: str | dict[str, str] | None) -> str | None:
    """The template to render with, from a tokenizer's `chat_template` attribute.

    transformers loads chat_template.jinja or tokenizer_config.json's "chat_template" into it; a
    list of named templates there becomes {name: template}, of which "default" is the one used.
    """
    return template.get("default") if isinstance(template, dict) else template


def render_chat(
    template: str,
    messages: list[dict[str, Any]],
    special_tokens: dict[str, str],
    add_generation_prompt: bool = False,
    **template_kwargs: Any,
) -> str:
    """Render one conversation (a list of {"role", "content"} messages) to the prompt text."""
    compiled = _compile(template)
    variables = {**special_tokens, **_plain(template_kwargs)}
    try:
        return compiled.render(messages=_plain(messages), add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as exc:
        raise InputError(f"The chat template rejected these messages: {exc}.") from None


def render_chat_text(
    template: str,
    messages: list[dict[str, Any]],
    special_tokens: dict[str, str],
    escapes: TextEscapes,
    add_generation_prompt: bool = False,
    **template_kwargs: Any,
) -> str:
    """Render one conversation for tokenizing, with every special-token string of its text escaped.

    Messages and template keywords have their strings escaped, then render as `render_chat` does,
    so the real special tokens of the prompt are the template's alone. Model-turn text goes in
    unescaped first, since templates cut the thought channel (<|channel>...<channel|>) out of it;
    that prompt is kept only when its special tokens are exactly those of the fully escaped one,
    that is when the template consumed every special-token string the model text held.
    """
    kwargs = escape_value(template_kwargs, escapes.escape)

    def render(keep_model_text: bool) -> str:
        escaped = escape_messages(messages, escapes.escape, keep_model_text)
        return render_chat(template, escaped, special_tokens, add_generation_prompt, **kwargs)

    escaped = render(keep_model_text=False)
    if not any(escapes.found(text) for text in _model_text(messages)):
        return escaped
    as_is = render(keep_model_text=True)
    return as_is if escapes.found(as_is) == escapes.found(escaped) else escaped


def template_text(value: Any) -> str:
    """Every string of `value` (dict keys too) as the template sees it, in one text."""
    return json.dumps(_plain(value), ensure_ascii=False)


def escape_messages(
    messages: list[dict[str, Any]], escape: Callable[[str], str], keep_model_text: bool = False
) -> list[dict[str, Any]]:
    """The messages with `escape` applied to every string a template may render, except media
    items' sources (read as media, never rendered) and, with `keep_model_text`, model-turn text."""
    return [
        _escape_message(message, escape, keep_model_text and message.get("role") in MODEL_ROLES) for message in messages
    ]


def escape_value(value: Any, escape: Callable[[str], str]) -> Any:
    """`value` with `escape` applied to each string in it, dict keys too; other values as they are."""
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, dict):
        return {escape(str(key)): escape_value(item, escape) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [escape_value(item, escape) for item in value]
    return value


def _escape_message(message: dict[str, Any], escape: Callable[[str], str], keep_text: bool) -> dict[str, Any]:
    escaped = {}
    for key, value in message.items():
        if key == "content":
            escaped[key] = _escape_content(value, escape, keep_text)
        else:
            escaped[escape(str(key))] = escape_value(value, escape)
    return escaped


def _escape_content(content: str | list[dict[str, Any]], escape: Callable[[str], str], keep_text: bool) -> Any:
    """A message's content (a string or a list of items, as check_messages allows)."""
    if isinstance(content, str):
        return content if keep_text else escape(content)
    return [_escape_item(item, escape, keep_text) for item in content]


def _escape_item(item: dict[str, Any], escape: Callable[[str], str], keep_text: bool) -> dict[str, Any]:
    kind = item.get("type")
    kept = MEDIA_SOURCES.get(kind, ("text",) if keep_text and kind == "text" else ())
    return {escape(str(key)): value if key in kept else escape_value(value, escape) for key, value in item.items()}


def _model_text(messages: list[dict[str, Any]]) -> Iterator[str]:
    """The text of the model turns: their string content and text items."""
    for message in messages:
        if message.get("role") not in MODEL_ROLES:
            continue
        content = message.get("content")
        if isinstance(content, str):
            yield content
        elif isinstance(content, (list, tuple)):
            yield from (item["text"] for item in content if item.get("type") == "text")


@lru_cache(maxsize=4)
def _compile(template: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment.from_string(template)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _plain(value: Any) -> Any:
    """A copy of `value` made of JSON types only; other objects become "<TypeName>"."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return f"<{type(value).__name__}>"
