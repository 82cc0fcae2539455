"""Constrained decoding: a reply held to a JSON schema, plain JSON, a regular expression, a Lark
grammar, or tool calls to given functions (tool_grammar.py).

    response_format (a JSON schema, a pydantic model, {"type": "json_object"}, ...) or tool_choice
    -> Constraint:
    its llguidance grammar, checked as it is made --one per sequence--> GrammarMask, a logits
    processor: an llguidance matcher kept in step with the reply's tokens, and every token the
    grammar refuses at the next position set to -inf

The grammar holds the answer: with thinking on, a thought channel the reply opens stays free and
the grammar starts once it closes. When the grammar is complete the end of turn is the only token
left. llguidance computes each mask over the whole vocabulary on the CPU, while the model runs (the
engine starts the step before it asks for the masks); xgrammar, the other engine built for LLM
tokenizers, needs torch at run time, which this package never does.
"""

from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_gemma4u.errors import InputError
from mlx_gemma4u.generation.tool_grammar import CALL_START, TOOL_TOKENS, call_grammar, tool_names

# JSON laid out as json.dumps writes it ({"a": 1, "b": [2, 3]}): no free whitespace to wander in.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


@dataclass(frozen=True)
class Constraint:
    """What a reply must match: `kind` ("json_schema", "json_object", "regex", "lark" or
    "tool_call"), `source` (the schema as JSON, the regex, the Lark text, the functions' names) and
    `grammar`, the llguidance grammar it compiles to (checked when made)."""

    kind: str
    source: str
    grammar: str
    opens: str | None = None  # a token after which the grammar holds, until it is complete (None: from the start)

    @classmethod
    def json_schema(cls, schema: dict) -> Constraint:
        if not isinstance(schema, dict):
            raise InputError(f"A JSON schema must be an object, got {type(schema).__name__}.")
        return cls._checked("json_schema", json.dumps(schema), _json_grammar({**schema}))

    @classmethod
    def json_object(cls) -> Constraint:
        return cls._checked("json_object", "{}", _json_grammar({"type": "object"}))

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        import llguidance

        return cls._checked("regex", pattern, llguidance.LLMatcher.grammar_from_regex(_text(pattern, "regex")))

    @classmethod
    def lark(cls, text: str) -> Constraint:
        import llguidance

        return cls._checked("lark", text, llguidance.LLMatcher.grammar_from_lark(_text(text, "grammar")))

    @classmethod
    def tool_choice(cls, tools: list[dict] | None, choice: Any) -> Constraint | None:
        """OpenAI's or Anthropic's tool_choice over OpenAI-form tools -> its constraint (None: none).

        "required" / "any": one or more calls, to any of the tools; a function's name
        ({"type": "function", "function": {"name": ...}} or {"type": "tool", "name": ...}): calls to
        it; "auto" (the default when there are tools): free, but a call the reply starts is held to
        its function's schema; "none": no call. Arguments are held to the function's `parameters`."""
        mode = _tool_mode(choice, bool(tools))
        if mode is None:
            return None
        if mode == "none":
            return cls.lark("start: TEXT\nTEXT: /(?s:.*)/")
        names = tool_names(tools) if mode in ("auto", "required") else [mode]
        if not names:
            raise InputError(f"tool_choice {choice!r} needs tools to call.")
        grammar = call_grammar(tools, names, TOOL_TOKENS, opened=mode == "auto")
        constraint = cls.lark(grammar)
        return cls("tool_call", json.dumps(names), constraint.grammar, CALL_START if mode == "auto" else None)

    @classmethod
    def of(cls, value: Any) -> Constraint | None:
        """A response format in any form the API takes -> its Constraint (None: free text).

        Forms: a Constraint; a JSON schema (dict); a pydantic model class; OpenAI's
        {"type": "text" | "json_object"} and {"type": "json_schema", "json_schema": {"schema": ...}};
        {"type": "regex", "regex": ...} and {"type": "lark", "grammar": ...}."""
        if value is None or isinstance(value, Constraint):
            return value
        if hasattr(value, "model_json_schema"):
            return cls.json_schema(value.model_json_schema())
        if not isinstance(value, dict):
            raise InputError(f"response_format must be a JSON schema or a pydantic model, got {type(value).__name__}.")
        kind = value.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls.json_object()
        if kind == "json_schema":
            inner = value.get("json_schema")
            if not isinstance(inner, dict) or not isinstance(inner.get("schema"), dict):
                raise InputError('A "json_schema" response format needs {"json_schema": {"schema": {...}}}.')
            return cls.json_schema(inner["schema"])
        if kind == "regex":
            return cls.regex(value.get("regex"))
        if kind in ("lark", "grammar"):
            return cls.lark(value.get("grammar"))
        if isinstance(kind, str) and kind not in JSON_TYPES:
            known = "text, json_object, json_schema, regex, lark"
            raise InputError(f"response_format type {kind!r} is not one of {known}.")
        return cls.json_schema(value)

    @classmethod
    def _checked(cls, kind: str, source: str, grammar: str) -> Constraint:
        import llguidance

        error = llguidance.LLMatcher.validate_grammar(grammar)
        if error:
            what = {"json_schema": "JSON schema", "json_object": "JSON", "regex": "regular expression"}
            detail = " ".join(error.strip().splitlines()).rstrip(".")
            raise InputError(f"The {what.get(kind, 'grammar')} cannot be used: {detail}.")
        return cls(kind, source, grammar)


class GrammarMask:
    """One sequence's constraint as an mlx-lm logits processor: (history, (1, vocab) logits) ->
    the logits with every token the grammar refuses next at -inf.

    history is the prompt's ids followed by the reply's tokens so far (TokenSampler's); the
    matcher consumes the reply's new tokens on each call. With thinking, a reply that opens the
    thought channel (`<|channel>`, allowed as its first token) is free until `<channel|>`. A
    constraint that `opens` at a token (a tool call's `<|tool_call>`) leaves the reply free until
    that token, then holds it until the grammar is complete, as often as the token comes.
    """

    def __init__(self, constraint: Constraint, tokenizer, vocab_size: int, prompt_tokens: int, thinking: bool):
        import llguidance

        self.matcher = llguidance.LLMatcher(ll_tokenizer(tokenizer, vocab_size), constraint.grammar)
        if self.matcher.is_error():
            raise InputError(f"The response format cannot be used: {self.matcher.get_error()}")
        if constraint.kind == "tool_call" and any(
            tokenizer.convert_tokens_to_ids(text) != i for text, i in TOOL_TOKENS.items()
        ):
            raise InputError(
                "This tokenizer's tool-call tokens are not Gemma 4's, so calls cannot be held to a schema."
            )
        channel = tokenizer.convert_tokens_to_ids(["<|channel>", "<channel|>"])
        with_channel = thinking and constraint.opens is None and None not in channel
        self.channel = channel if with_channel else None  # (opening, closing) ids
        self.opens = None if constraint.opens is None else tokenizer.convert_tokens_to_ids(constraint.opens)
        self.prompt_tokens = self.read = prompt_tokens  # history up to `read` has been consumed
        self.answer = self.channel is None  # past the thought channel, if any
        self.thinking = False  # inside the thought channel
        self.held = self.opens is None  # the grammar holds the next token
        self.words = np.zeros((vocab_size + 31) // 32, dtype=np.int32)

    def __call__(self, history: mx.array, logits: mx.array) -> mx.array:
        first = self.channel is not None and history.shape[0] == self.prompt_tokens
        # numpy reads the (already computed) history without queueing an op behind the running step
        for token in np.asarray(history)[self.read :].tolist():
            self._consume(token)
        self.read = history.shape[0]
        if self.thinking or not self.held:
            return logits
        self.matcher.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)
        if first:  # the reply's first token: the answer's, or the thought channel's opening
            self.words.view(np.uint32)[self.channel[0] // 32] |= np.uint32(1 << (self.channel[0] % 32))
        allowed = np.unpackbits(self.words.view(np.uint8), bitorder="little")[: logits.shape[-1]]
        return mx.where(mx.array(allowed.view(np.bool_)), logits, -mx.inf)

    def _consume(self, token: int) -> None:
        if not self.answer:
            if self.thinking:
                self.thinking = token != self.channel[1]
                self.answer = not self.thinking
                return
            if token == self.channel[0]:
                self.thinking = True
                return
            self.answer = True
        if not self.held:  # free until the grammar's opening token
            self.held = token == self.opens
            return
        if not self.matcher.consume_token(token):
            raise InputError(f"The reply left its response format: {self.matcher.get_error()}")
        if self.opens is not None and self.matcher.is_accepting():  # the call is complete: free again
            self.matcher.reset()
            self.held = False


def _tool_mode(choice: Any, has_tools: bool) -> str | None:
    """tool_choice in OpenAI's or Anthropic's form -> "auto", "none", "required", a function's
    name, or None (nothing to hold: there are no tools)."""
    if isinstance(choice, dict):
        kind, function = choice.get("type"), choice.get("function")
        if kind in ("function", "tool"):
            name = function.get("name") if kind == "function" and isinstance(function, dict) else choice.get("name")
            if not isinstance(name, str):
                raise InputError("tool_choice names no function: give the function's name.")
            return name
        choice = kind
    if choice in (None, "auto", "none"):
        return (choice or "auto") if has_tools else None
    if choice in ("required", "any"):
        return "required"
    raise InputError(f"tool_choice must be auto, none, required or a function, got {choice!r}.")


_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def ll_tokenizer(tokenizer, vocab_size: int):
    """llguidance's view of `tokenizer` (its tokenizer.json), built once per tokenizer: it takes seconds."""
    import llguidance

    with _LOCK:
        built = _TOKENIZERS.get(tokenizer)
        if built is None or built.vocab_size != vocab_size:
            end = tokenizer.convert_tokens_to_ids("<turn|>")
            eos = end if end is not None else tokenizer.eos_token_ids[0]
            built = llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=vocab_size, eos_token=eos)
            _TOKENIZERS[tokenizer] = built
        return built


def _json_grammar(schema: dict) -> str:
    import llguidance

    schema.setdefault("x-guidance", JSON_OPTIONS)
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema)
    except (TypeError, ValueError) as error:
        raise InputError(f"The JSON schema cannot be used: {error}.") from None


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise InputError(f"A {what} response format needs the {what} as a non-empty string, got {value!r}.")
    return value
