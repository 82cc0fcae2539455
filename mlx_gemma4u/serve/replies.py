"""A streamed reply, token by token -> its answer text, its thought channel and its tool calls.

Gemma 4 marks both with special tokens, hidden from the streamed text: `<|channel>thought ...
<channel|>` around the thinking, `<|tool_call>call:NAME{args}<tool_call|>` around each tool call.
The ids say where each part starts and ends; a tool call's own tokens are decoded with their
special tokens (its strings are delimited by `<|"|>`) and parsed by mlx-lm's Gemma 4 tool parser.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

THOUGHT_NAME = "thought"  # the channel's name opens its text


@dataclass
class Delta:
    """What one token added: answer text, thought text, and tool calls completed by it."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict] = field(default_factory=list)


class Reply:
    def __init__(self, tokenizer):
        ids = tokenizer.convert_tokens_to_ids(["<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>"])
        self.channel_start, self.channel_end, self.call_start, self.call_end = ids
        self.tokenizer = tokenizer
        self.content, self.reasoning, self.tool_calls = "", "", []
        self._in_thought, self._thought_head = False, None
        self._call: list[int] | None = None

    def add(self, token: int | None, text: str) -> Delta:
        """One streamed response (its token and text segment) -> what it adds."""
        if token == self.channel_start:
            self._in_thought, self._thought_head = True, ""
            return Delta()
        if token == self.channel_end:
            self._in_thought = False
            return Delta()
        if token == self.call_start and self.call_start is not None:
            self._call = []
            return Delta()
        if self._call is not None:
            if token == self.call_end:
                calls, self._call = self._parse(self._call), None
                self.tool_calls += calls
                return Delta(tool_calls=calls)
            self._call.append(token)
            return Delta()
        if self._in_thought:
            return Delta(reasoning=self._thought(text))
        self.content += text
        return Delta(content=text)

    def _thought(self, text: str) -> str:
        """Thought text without the channel's name and the newline after it (held back until known)."""
        if self._thought_head is not None:
            self._thought_head += text
            head = THOUGHT_NAME + "\n"
            if head.startswith(self._thought_head) and self._thought_head != head:
                return ""  # may still turn out to be the name
            text, self._thought_head = self._thought_head, None
            if text.startswith(THOUGHT_NAME):
                text = text[len(THOUGHT_NAME):].lstrip("\n")
        self.reasoning += text
        return text

    def _parse(self, ids: list[int]) -> list[dict]:
        from mlx_lm.tool_parsers.gemma4 import parse_tool_call

        text = self.tokenizer.decode(ids)
        try:
            parsed = parse_tool_call(text)
        except (ValueError, json.JSONDecodeError):
            self.content += text  # not a call after all: keep what the model wrote
            return []
        return [{"id": f"call_{uuid.uuid4().hex[:24]}", "name": call["name"], "arguments": call["arguments"]}
                for call in (parsed if isinstance(parsed, list) else [parsed])]
