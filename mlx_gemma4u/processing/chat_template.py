"""Render a checkpoint's Jinja chat template the way transformers does.

transformers compiles templates in jinja2's immutable sandbox with trim_blocks and lstrip_blocks,
the loopcontrols extension, a `tojson` that keeps non-ASCII text, and the helpers
`raise_exception` and `strftime_now`. The template also sees the tokenizer's special tokens
(`bos_token`, ...) and the caller's extra keywords (for example `enable_thinking`).
Message values that are not plain JSON data (decoded images, arrays) are shown to the template
as an inert "<TypeName>" string, since templates only test whether a media key is present.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mlx_gemma4u.errors import InputError


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


@lru_cache(maxsize=4)
def _compile(template: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment.from_string(template)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
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
