"""A request's tokens (worker.Token) -> the API's reply: OpenAI's chat.completion and
text_completion, Anthropic's message, whole or as streaming events.

A reply whose time ran out finishes with finish_reason / stop_reason "timeout", never "length",
so that a client can tell it from a real length stop.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import PlainTextResponse

from mlx_gemma4u.generation.reply import Delta, Reply, ToolCall
from mlx_gemma4u.serve import schemas
from mlx_gemma4u.serve.worker import Token

ANTHROPIC_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "timeout": "timeout"}


def _usage(last: Token, cached: bool = True) -> dict:
    usage = {
        "prompt_tokens": last.prompt_tokens,
        "completion_tokens": last.generation_tokens,
        "total_tokens": last.prompt_tokens + last.generation_tokens,
    }
    if cached:
        usage["prompt_tokens_details"] = {"cached_tokens": last.prompt_tokens - last.prefilled_tokens}
    return usage


def _finish(last: Token, reply: Reply | None = None) -> str:
    if reply is not None and reply.tool_calls and last.finish_reason != "timeout":
        return "tool_calls"
    return last.finish_reason or "length"


class OpenAIChat:
    """Tokens -> a chat.completion, or chat.completion.chunk events."""

    def __init__(self, tokenizer, model: str, body: schemas.ChatCompletion):
        self.tokenizer, self.model, self.body = tokenizer, model, body
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.reply = Reply(tokenizer)
        self.calls = 0  # tool calls streamed so far: the next one's index

    def _logprobs(self, token: Token) -> list[dict]:
        if not self.body.logprobs or token.token is None:
            return []
        entry = self._entry(token.token, token.logprob)
        entry["top_logprobs"] = [self._entry(t, logprob) for t, logprob in token.top_logprobs]
        return [entry]

    def _entry(self, token: int, logprob: float) -> dict:
        text = self.tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def _chunk(self, delta: dict, finish: str | None = None, logprobs: list | None = None) -> dict:
        choice = {
            "index": 0,
            "delta": delta,
            "finish_reason": finish,
            "logprobs": {"content": logprobs} if logprobs else None,
        }
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

    async def stream(self, tokens: AsyncIterator[Token]) -> AsyncIterator[dict]:
        yield self._chunk({"role": "assistant", "content": ""})
        last = None
        async for last in tokens:
            out = self._delta(self.reply.add(last.token, last.text))
            logprobs = self._logprobs(last)
            if out or logprobs:
                yield self._chunk(out, logprobs=logprobs)
        if last is not None:
            if out := self._delta(self.reply.finish()):
                yield self._chunk(out)
            yield self._chunk({}, _finish(last, self.reply))
            if self.body.stream_options and self.body.stream_options.include_usage:
                yield {**self._chunk({}), "choices": [], "usage": _usage(last)}

    def _delta(self, delta: Delta) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if delta.content:
            out["content"] = delta.content
        if delta.reasoning:
            out["reasoning_content"] = delta.reasoning
        if delta.tool_calls:
            out["tool_calls"] = [_openai_call(c, self.calls + i) for i, c in enumerate(delta.tool_calls)]
            self.calls += len(delta.tool_calls)
        return out

    async def whole(self, tokens: AsyncIterator[Token]) -> dict:
        last, logprobs = None, []
        async for last in tokens:
            self.reply.add(last.token, last.text)
            logprobs += self._logprobs(last)
        self.reply.finish()
        message: dict[str, Any] = {"role": "assistant", "content": self.reply.content}
        if self.reply.reasoning:
            message["reasoning_content"] = self.reply.reasoning
        if self.reply.tool_calls:
            message["tool_calls"] = [_openai_call(c, i) for i, c in enumerate(self.reply.tool_calls)]
        choice = {
            "index": 0,
            "message": message,
            "finish_reason": _finish(last, self.reply),
            "logprobs": {"content": logprobs} if self.body.logprobs else None,
        }
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": _usage(last),
        }


def _openai_call(call: ToolCall, index: int) -> dict:
    return {
        "index": index,
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
    }


class OpenAICompletion:
    """Tokens -> a text_completion (the prompt is used verbatim, no chat template); `logprobs: N`
    gives each token's log-probability and the N most likely, in the legacy completions shape."""

    def __init__(self, tokenizer, model: str, body: schemas.Completion):
        self.tokenizer, self.model, self.body = tokenizer, model, body
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        self.offset = 0

    def _logprobs(self, tokens: list[Token]) -> dict | None:
        if self.body.logprobs is None:
            return None
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token in tokens:
            if token.token is None:
                continue
            out["tokens"].append(self.tokenizer.decode([token.token]))
            out["token_logprobs"].append(token.logprob)
            out["top_logprobs"].append({self.tokenizer.decode([t]): lp for t, lp in token.top_logprobs})
            out["text_offset"].append(self.offset)
            self.offset += len(token.text)
        return out

    def _body(self, text: str, finish: str | None, tokens: list[Token]) -> dict:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": self._logprobs(tokens)}],
        }

    async def stream(self, tokens: AsyncIterator[Token]) -> AsyncIterator[dict]:
        last = None
        async for last in tokens:
            if last.text or (self.body.logprobs is not None and last.token is not None):
                yield self._body(last.text, None, [last])
        if last is not None:
            yield self._body("", _finish(last), [])
            if self.body.stream_options and self.body.stream_options.include_usage:
                yield {**self._body("", None, []), "choices": [], "usage": _usage(last, cached=False)}

    async def whole(self, tokens: AsyncIterator[Token]) -> dict:
        every = [token async for token in tokens]
        text = "".join(token.text for token in every)
        return {**self._body(text, _finish(every[-1]), every), "usage": _usage(every[-1], cached=False)}


class AnthropicMessage:
    """Tokens -> an Anthropic message, or its streaming events."""

    def __init__(self, tokenizer, model: str, body: schemas.Message):
        self.model, self.body = model, body
        self.id = f"msg_{uuid.uuid4().hex[:24]}"
        self.reply = Reply(tokenizer)
        self.index, self.open_kind = 0, None  # the streamed content block: its index, "thinking" / "text" / None

    def _stop(self, last: Token) -> tuple[str, str | None]:
        if self.reply.tool_calls and last.finish_reason != "timeout":
            return "tool_use", None
        stops = self.body.stop_sequences or []
        if last.finish_reason == "stop" and stops and last.token not in self.reply.tokenizer.eos_token_ids:
            return "stop_sequence", stops[0] if len(stops) == 1 else None
        return ANTHROPIC_STOP.get(last.finish_reason or "length", "end_turn"), None

    def _usage(self, last: Token) -> dict:
        return {
            "input_tokens": last.prompt_tokens,
            "output_tokens": last.generation_tokens,
            "cache_read_input_tokens": last.prompt_tokens - last.prefilled_tokens,
        }

    def _start(self, first: Token) -> dict:
        return {
            "type": "message_start",
            "message": {
                "id": self.id,
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": first.prompt_tokens, "output_tokens": 0},
            },
        }

    async def stream(self, tokens: AsyncIterator[Token]) -> AsyncIterator[dict]:
        last = None
        async for token in tokens:
            if last is None:
                yield self._start(token)
            last = token
            for event in self._events(self.reply.add(token.token, token.text)):
                yield event
        for event in self._events(self.reply.finish()) + self._close_block():
            yield event
        if last is not None:
            reason, sequence = self._stop(last)
            yield {
                "type": "message_delta",
                "delta": {"stop_reason": reason, "stop_sequence": sequence},
                "usage": {"output_tokens": last.generation_tokens},
            }
            yield {"type": "message_stop"}

    def _events(self, delta: Delta) -> list[dict]:
        """One delta -> its streaming events: thinking and text go into the open block of their kind
        (closing the other), each tool call is a block of its own."""
        events = []
        for kind, text in (("thinking", delta.reasoning), ("text", delta.content)):
            if not text:
                continue
            if self.open_kind != kind:
                events += self._close_block()
                self.open_kind = kind
                events.append(
                    {"type": "content_block_start", "index": self.index, "content_block": {"type": kind, kind: ""}}
                )
            key = "thinking_delta" if kind == "thinking" else "text_delta"
            events.append({"type": "content_block_delta", "index": self.index, "delta": {"type": key, kind: text}})
        for call in delta.tool_calls:
            events += self._close_block()
            events += [
                {
                    "type": "content_block_start",
                    "index": self.index,
                    "content_block": {"type": "tool_use", "id": call.id, "name": call.name, "input": {}},
                },
                {
                    "type": "content_block_delta",
                    "index": self.index,
                    "delta": {"type": "input_json_delta", "partial_json": json.dumps(call.arguments)},
                },
                {"type": "content_block_stop", "index": self.index},
            ]
            self.index += 1
        return events

    def _close_block(self) -> list[dict]:
        if self.open_kind is None:
            return []
        stop = {"type": "content_block_stop", "index": self.index}
        self.index, self.open_kind = self.index + 1, None
        return [stop]

    async def whole(self, tokens: AsyncIterator[Token]) -> dict:
        last = None
        async for last in tokens:
            self.reply.add(last.token, last.text)
        self.reply.finish()
        content: list[dict] = []
        if self.reply.reasoning:
            content.append({"type": "thinking", "thinking": self.reply.reasoning, "signature": ""})
        if self.reply.content or not self.reply.tool_calls:
            content.append({"type": "text", "text": self.reply.content})
        content += [
            {"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments} for c in self.reply.tool_calls
        ]
        reason, sequence = self._stop(last)
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": self._usage(last),
        }


class Transcript:
    """Tokens -> OpenAI's transcription (or translation): {"text"} for json, the bare text for text,
    task, language, duration and text for verbose_json; streamed as transcript.text.delta events
    and a transcript.text.done."""

    def __init__(self, body: schemas.Transcription, task: str, clip: dict):
        self.body, self.task, self.clip = body, task, clip  # clip: the prepared audio's "seconds"

    async def stream(self, tokens: AsyncIterator[Token]) -> AsyncIterator[dict]:
        text = ""
        async for token in tokens:
            if token.text:
                text += token.text
                yield {"type": "transcript.text.delta", "delta": token.text}
        yield {"type": "transcript.text.done", "text": text}

    async def whole(self, tokens: AsyncIterator[Token]):
        text = "".join([token.text async for token in tokens])
        if self.body.response_format == "text":
            return PlainTextResponse(text)
        if self.body.response_format == "verbose_json":
            language = self.body.language or "unknown"
            return {"task": self.task, "language": language, "duration": self.clip["seconds"], "text": text}
        return {"text": text}
