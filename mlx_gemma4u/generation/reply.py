"""A reply's text: its tokens as text to show, cut at stop strings, and when it is finished; then
that text split into its parts (Reply): the answer, the thought channel and the tool calls."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field


class ReplyText:
    """A sequence's new tokens -> the text to show: special tokens hidden, multi-byte characters whole,
    cut before the first stop string; says when the reply is finished and why. Without a tokenizer
    (token ids only, as parity runs want) there is no text and only max_tokens ends a reply."""

    def __init__(self, tokenizer, stop: list[str] | None):
        self.stops = set(tokenizer.eos_token_ids) if tokenizer is not None else set()
        self.hidden = set(tokenizer.all_special_ids) | self.stops if tokenizer is not None else set()
        self.text = _StopText(stop or [])
        self.detokenizer = tokenizer.detokenizer if tokenizer is not None else None
        if self.detokenizer is not None:
            self.detokenizer.reset()

    def add(self, token: int, last: bool) -> tuple[str, str | None]:
        """One new token (`last`: max_tokens reached) -> (text to show now, "stop" / "length" / None)."""
        finish = "stop" if token in self.stops else "length" if last else None
        if self.detokenizer is None:
            return "", finish
        if token not in self.hidden:
            self.detokenizer.add_token(token)
        if finish:
            self.detokenizer.finalize()
        # A hidden marker (the thought channel's, a tool call's) ends a part of the reply: the text
        # held back for stop strings is shown with it, so that it stays in the part it belongs to.
        ends_part = finish is not None or token in self.hidden
        segment, hit = self.text.add(self.detokenizer.last_segment, final=ends_part)
        return segment, "stop" if hit else finish


class _StopText:
    """Holds back just enough streamed text to cut it at the first stop string."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) - 1 for s in self.stops), default=0)  # a stop string may start this far back
        self.pending = ""

    def add(self, segment: str, final: bool) -> tuple[str, bool]:
        """-> (text safe to show now, whether a stop string was reached)."""
        self.pending += segment
        cuts = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if cuts:
            out, self.pending = self.pending[: min(cuts)], ""
            return out, True
        keep = 0 if final else self.hold
        out = self.pending[: len(self.pending) - keep] if keep else self.pending
        self.pending = self.pending[len(out) :]
        return out, False


THOUGHT_NAME = "thought\n"  # the thought channel's name line, which opens its text: `<|channel>thought\n`


@dataclass(frozen=True)
class ToolCall:
    """One tool call the model made: `call:NAME{args}` parsed, with an id for the API to refer to it."""

    id: str
    name: str
    arguments: dict


@dataclass
class Delta:
    """What one token added: answer text, thought text, and the tool calls it completed."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


class Reply:
    """A streamed reply, fed (token, text segment) as ReplyText hands them out -> its answer
    (`content`), its thought channel without the channel's name (`reasoning`) and its `tool_calls`,
    with a Delta per token that adds up to them.

    Gemma 4 marks the parts with special tokens, hidden from the streamed text: `<|channel>thought\n
    ... <channel|>` around the thinking, `<|tool_call>call:NAME{args}<tool_call|>` around each tool
    call. The ids say where each part starts and ends. A tool call's own tokens are decoded with their
    special tokens (its strings are delimited by `<|"|>`) and parsed by mlx-lm's Gemma 4 tool parser;
    one that does not parse, or that the reply ends inside, stays in the answer as the model wrote it.
    """

    def __init__(self, tokenizer):
        ids = tokenizer.convert_tokens_to_ids(["<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>"])
        # -1, never a token, for a marker the tokenizer lacks
        self.channel_start, self.channel_end, self.call_start, self.call_end = (-1 if i is None else i for i in ids)
        self.tokenizer = tokenizer
        self.content, self.reasoning = "", ""
        self.tool_calls: list[ToolCall] = []
        self.in_thought = False
        self._head: str | None = None  # the thought's first text, held while it may still be the channel's name
        self._call: list[int] | None = None  # the open tool call's token ids

    def add(self, token: int | None, text: str) -> Delta:
        """One streamed token and its text segment -> what it adds."""
        if self._call is not None:
            if token == self.call_end:
                ids, self._call = self._call, None
                return self._close_call(ids)
            if token is not None:  # None: a reply's time ran out, no token came
                self._call.append(token)
            return Delta()
        # a segment is text written up to its token: a marker's own (text held back until then) is the part it ends
        delta = Delta(reasoning=self._thought(text)) if self.in_thought else self._answer(text)
        if token == self.call_start:
            self._call = []
        elif token == self.channel_start:
            self.in_thought, self._head = True, ""
        elif token == self.channel_end:
            self.in_thought, self._head = False, None  # a name cut short is still the name
        return delta

    def finish(self) -> Delta:
        """The reply has ended: a tool call left open is not a call, so its text joins the answer."""
        if self._call is None:
            return Delta()
        ids, self._call = self._call, None
        return self._answer(self.tokenizer.decode(ids))

    def _answer(self, text: str) -> Delta:
        self.content += text
        return Delta(content=text)

    def _thought(self, text: str) -> str:
        """Thought text without the channel's name line, held back until it is known not to be it."""
        if self._head is not None:
            self._head += text
            if THOUGHT_NAME.startswith(self._head) and self._head != THOUGHT_NAME:
                return ""
            text, self._head = self._head.removeprefix(THOUGHT_NAME), None
        self.reasoning += text
        return text

    def _close_call(self, ids: list[int]) -> Delta:
        text = self.tokenizer.decode(ids)
        calls = _parse_calls(text)
        if not calls:
            return self._answer(text)
        self.tool_calls += calls
        return Delta(tool_calls=calls)


def _parse_calls(text: str) -> list[ToolCall]:
    """`call:NAME{args}` (one or more) -> its calls; none where the text is not a valid call."""
    from mlx_lm.tool_parsers.gemma4 import parse_tool_call

    try:
        parsed = parse_tool_call(text)
    except ValueError:  # json.JSONDecodeError is one too
        return []
    return [
        ToolCall(f"call_{uuid.uuid4().hex[:24]}", call["name"], call["arguments"])
        for call in (parsed if isinstance(parsed, list) else [parsed])
    ]
