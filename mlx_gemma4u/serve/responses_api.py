"""OpenAI's Responses API: a request's tools and text format in the forms the rest of the server
takes, its tokens -> a response object or its streaming events, and the store that keeps
responses for GET, DELETE, cancel and `previous_response_id`.

A follow-up (`previous_response_id`) is the stored conversation's items, the previous output
included, then its own input, rendered as one prompt: it is exactly the request that sends the
whole conversation. The server's prompt-prefix cache (worker.py) holds the previous turn's keys
and values, so only what the previous reply does not share with the new prompt is prefilled.
"""

from __future__ import annotations

import copy
import json
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import contextmanager

from mlx_gemma4u.errors import InputError
from mlx_gemma4u.generation.reply import Delta, Reply
from mlx_gemma4u.serve import schemas
from mlx_gemma4u.serve.errors import NotFound
from mlx_gemma4u.serve.worker import Token

PART = {"reasoning": "reasoning_text", "message": "output_text"}  # a text item's kind -> its content part's


def input_items(value: str | list[dict]) -> list[dict]:
    """`input` as a string or items -> items."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if not value:
        raise InputError("input is empty: give a string or at least one item.")
    return value


def function_tools(tools: list[dict] | None) -> list[dict]:
    """Responses' function tools ({"type": "function", "name", "parameters", ...}) -> chat's form."""
    out = []
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("name"), str):
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise InputError(f"tools[{i}] is of type {kind!r}; this server runs no tools itself, only named functions.")
        function = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
        out.append({"type": "function", "function": function})
    return out


def response_format(text: dict | None) -> dict | None:
    """`text.format` -> chat's response_format ({"type": "json_schema", "schema": ...} moves into
    "json_schema"); None for free text."""
    form = (text or {}).get("format")
    if not isinstance(form, dict) or form.get("type") != "json_schema":
        return form
    return {"type": "json_schema", "json_schema": {k: v for k, v in form.items() if k != "type"}}


class ResponseReply:
    """Tokens -> a response object, or its streaming events (each numbered in `sequence_number`).
    `snapshot()` is the response so far: GET answers with it while the reply runs."""

    def __init__(self, tokenizer, model: str, body: schemas.ResponseCreate, items: list[dict]):
        self.body, self.model, self.items = body, model, items
        self.id, self.created_at = f"resp_{uuid.uuid4().hex}", int(time.time())
        self.reply = Reply(tokenizer)
        self.cancelled = threading.Event()  # set by POST .../cancel: the worker drops the job
        self.status, self.error, self.incomplete = "in_progress", None, None
        self.last: Token | None = None  # the latest token: its counts are the usage so far
        self.output: list[dict] = []
        self.open: dict | None = None  # the reasoning or message item text is streaming into
        self.sequence = 0
        self.reasoning_tokens = 0

    def snapshot(self) -> dict:
        body = self.body
        return copy.deepcopy(
            {
                "id": self.id,
                "object": "response",
                "created_at": self.created_at,
                "status": self.status,
                "error": self.error,
                "incomplete_details": self.incomplete,
                "instructions": body.instructions,
                "max_output_tokens": body.max_output_tokens,
                "model": self.model,
                "output": self.output,
                "parallel_tool_calls": body.parallel_tool_calls,
                "previous_response_id": body.previous_response_id,
                "reasoning": {"effort": (body.reasoning or {}).get("effort"), "summary": None},
                "store": body.store,
                "temperature": body.temperature,
                "top_p": body.top_p,
                "text": {"format": (body.text or {}).get("format") or {"type": "text"}},
                "tool_choice": body.tool_choice or "auto",
                "tools": body.tools or [],
                "truncation": "disabled",
                "usage": None if self.last is None else _usage(self.last, self.reasoning_tokens),
                "metadata": body.metadata or {},
                "background": False,
            }
        )

    def history(self) -> list[dict]:
        """The conversation's items up to and with this reply's output: a follow-up's start."""
        if self.status == "in_progress":
            raise InputError(f"Response {self.id} is still in progress; wait for it before following it up.")
        return self.items + [{k: v for k, v in item.items() if k != "id"} for item in self.output]

    async def stream(self, tokens: AsyncIterator[Token]) -> AsyncIterator[dict]:
        yield self._event("response.created", response=self.snapshot())
        yield self._event("response.in_progress", response=self.snapshot())
        last = None
        with self._failing():
            async for last in tokens:
                for event in self._add(last):
                    yield event
        for event in self._finish(last):
            yield event
        kind = "response.completed" if self.status == "completed" else "response.incomplete"
        yield self._event(kind, response=self.snapshot())

    async def whole(self, tokens: AsyncIterator[Token]) -> dict:
        last = None
        with self._failing():
            async for last in tokens:
                self._add(last)
        self._finish(last)
        return self.snapshot()

    @contextmanager
    def _failing(self):
        """An error ends the response as failed (and is raised on); a client that left, as cancelled."""
        try:
            yield
        except Exception as e:
            self.status, self.error = "failed", {"code": getattr(e, "kind", "api_error"), "message": str(e)}
            raise
        except BaseException:  # the stream was closed: its client is gone
            self.status = "cancelled"
            raise

    def _event(self, kind: str, **fields) -> dict:
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence - 1, **fields}

    def _add(self, token: Token) -> list[dict]:
        thinking = self.reply.in_thought
        delta = self.reply.add(token.token, token.text)
        self.reasoning_tokens += thinking or self.reply.in_thought
        self.last = token
        return self._events(delta)

    def _finish(self, last: Token | None) -> list[dict]:
        events = self._events(self.reply.finish()) + self._close()
        if not any(item["type"] in ("message", "function_call") for item in self.output):
            events += self._open("message") + self._close()  # every reply says something, if only ""
        reason = last.finish_reason if last is not None else None
        if reason != "timeout" and self.reply.tool_calls:  # as chat's finish_reason "tool_calls"
            reason = "stop"
        if self.status == "cancelled" or reason is None:
            self.status = "cancelled"
        elif reason in ("length", "timeout"):
            self.status = "incomplete"
            self.incomplete = {"reason": "max_output_tokens" if reason == "length" else "timeout"}
        else:
            self.status = "completed"
        return events

    def _events(self, delta: Delta) -> list[dict]:
        """One delta -> its events: thought and answer text go into an open item of their kind
        (closing the other), each function call is an item of its own."""
        events = self._text("reasoning", delta.reasoning) + self._text("message", delta.content)
        for call in delta.tool_calls:
            events += self._close()
            arguments = json.dumps(call.arguments)
            item = {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call.id, "name": call.name}
            where = {"item_id": item["id"], "output_index": len(self.output)}
            self.output.append({**item, "arguments": arguments, "status": "completed"})
            events += [
                self._event("response.output_item.added", output_index=where["output_index"], item=item),
                self._event("response.function_call_arguments.delta", **where, delta=arguments),
                self._event("response.function_call_arguments.done", **where, name=call.name, arguments=arguments),
                self._event("response.output_item.done", output_index=where["output_index"], item=self.output[-1]),
            ]
        return events

    def _text(self, kind: str, text: str) -> list[dict]:
        if not text:
            return []
        events = self._open(kind) if self.open is None or self.open["type"] != kind else []
        self.open["content"][0]["text"] += text
        return events + [self._event(f"response.{PART[kind]}.delta", **self._where(), delta=text, **_logprobs(kind))]

    def _open(self, kind: str) -> list[dict]:
        """Close the open item, open one of `kind` with an empty text part."""
        events = self._close()
        prefix, more = ("rs", {"summary": []}) if kind == "reasoning" else ("msg", {"role": "assistant"})
        self.open = {"type": kind, "id": f"{prefix}_{uuid.uuid4().hex}", "status": "in_progress", **more}
        self.open["content"] = []
        self.output.append(self.open)
        events.append(self._event("response.output_item.added", output_index=len(self.output) - 1, item=self.open))
        self.open["content"].append(_part(kind))
        return events + [self._event("response.content_part.added", **self._where(), part=_part(kind))]

    def _close(self) -> list[dict]:
        if self.open is None:
            return []
        item, where = self.open, self._where()
        part = item["content"][0]
        item["status"] = "completed"
        self.open = None
        return [
            self._event(f"response.{PART[item['type']]}.done", **where, text=part["text"], **_logprobs(item["type"])),
            self._event("response.content_part.done", **where, part=part),
            self._event("response.output_item.done", output_index=where["output_index"], item=item),
        ]

    def _where(self) -> dict:
        return {"item_id": self.open["id"], "output_index": len(self.output) - 1, "content_index": 0}


def _part(kind: str) -> dict:
    """An empty content part of a reasoning or message item."""
    return {"type": PART[kind], "text": "", **({"annotations": []} if kind == "message" else {})}


def _logprobs(kind: str) -> dict:
    return {"logprobs": []} if kind == "message" else {}


def _usage(last: Token, reasoning_tokens: int) -> dict:
    return {
        "input_tokens": last.prompt_tokens,
        "input_tokens_details": {"cached_tokens": last.prompt_tokens - last.prefilled_tokens},
        "output_tokens": last.generation_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": last.prompt_tokens + last.generation_tokens,
    }


class ResponseStore:
    """Stored responses (`store`, the default), newest last, at most `max_responses` of them and
    `max_bytes` of their items (media included): the oldest go first."""

    def __init__(self, max_responses: int = 256, max_bytes: int = 256 << 20):
        self.max_responses, self.max_bytes = max_responses, max_bytes
        self._replies: OrderedDict[str, tuple[ResponseReply, int]] = OrderedDict()
        self._bytes = 0  # the sizes in _replies, added up

    def add(self, reply: ResponseReply) -> None:
        size = len(json.dumps(reply.items))
        self._replies[reply.id] = (reply, size)
        self._bytes += size
        while len(self._replies) > 1 and (len(self._replies) > self.max_responses or self._bytes > self.max_bytes):
            self._bytes -= self._replies.popitem(last=False)[1][1]

    def get(self, response_id: str) -> ResponseReply:
        found = self._replies.get(response_id)
        if found is None:
            raise NotFound(f"No stored response has the id {response_id!r}.")
        return found[0]

    def get_for_follow_up(self, response_id: str) -> list[dict]:
        """The items a follow-up of `response_id` starts from (an unknown id is the request's error: 400)."""
        found = self._replies.get(response_id)
        if found is None:
            raise InputError(f"previous_response_id {response_id!r} names no stored response.")
        self._replies.move_to_end(response_id)
        return found[0].history()

    def delete(self, response_id: str) -> None:
        self.get(response_id)
        self._bytes -= self._replies.pop(response_id)[1]

    def cancel(self, response_id: str) -> ResponseReply:
        reply = self.get(response_id)
        if reply.status != "in_progress":
            raise InputError(f"Response {response_id} is {reply.status}; only one in progress can be cancelled.")
        reply.status = "cancelled"
        reply.cancelled.set()
        return reply
