"""The HTTP app (FastAPI on uvicorn): OpenAI's /v1/chat/completions, /v1/completions and
/v1/models, Anthropic's /v1/messages, and /health.

Every error is a JSON body in the API's own shape with a 4xx code (5xx only for a fault of ours),
never a traceback; the server keeps answering. With --api-key, requests need `Authorization:
Bearer KEY` or `x-api-key: KEY`. It binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from typing import Any, AsyncIterator, Callable

import mlx.core as mx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import Gemma4UError
from . import schemas
from .messages import MediaReader, anthropic_messages, openai_messages
from .replies import Reply
from .worker import DONE, Busy, Worker
from .worker import Request as Job

ANTHROPIC_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


class Settings:
    def __init__(self, model_name: str, api_key: str | None, allow_local_files: bool, timeout: float):
        self.model_name, self.api_key = model_name, api_key
        self.allow_local_files, self.timeout = allow_local_files, timeout


def create_app(worker: Worker, settings: Settings, allowed_origins: list[str] | None = None) -> FastAPI:
    app = FastAPI(title="mlx-gemma4u", docs_url=None, redoc_url=None)
    if allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["*"], allow_headers=["*"])

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if settings.api_key and request.url.path != "/health" and not _authorized(request, settings.api_key):
            return _error(request, 401, "authentication_error", "Missing or wrong API key.")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(request, 400, "invalid_request_error", f"{where or 'body'}: {first.get('msg', 'invalid')}")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error(request, exc.status_code, "invalid_request_error", str(exc.detail))

    @app.exception_handler(Gemma4UError)
    async def refused(request: Request, exc: Gemma4UError):
        if isinstance(exc, Busy):
            return _error(request, 429, "rate_limit_error", str(exc))
        return _error(request, 400, "invalid_request_error", str(exc))

    @app.exception_handler(Exception)
    async def fault(request: Request, exc: Exception):
        return _error(request, 500, "api_error", f"Internal error ({type(exc).__name__}).")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "mlx-gemma4u"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: schemas.ChatCompletion, request: Request):
        _only_one(body.n)
        media = MediaReader(settings.allow_local_files)
        ours = _guarded(media, lambda: openai_messages(body.messages, media))
        job = Job(ours, _options(body, body.max_completion_tokens or body.max_tokens or 1024, _stops(body.stop)),
                  time.monotonic() + settings.timeout, media, body.tools,
                  _thinking(body.reasoning_effort, body.thinking))
        chat = OpenAIChat(worker.processor.tokenizer, settings.model_name, body)
        events = await _started(worker, job, request)
        return _sse(chat.stream(events), job) if body.stream else await chat.whole(events)

    @app.post("/v1/completions")
    async def completions(body: schemas.Completion, request: Request):
        _only_one(body.n)
        job = Job(body.prompt, _options(body, body.max_tokens, _stops(body.stop)), time.monotonic() + settings.timeout)
        completion = OpenAICompletion(settings.model_name, body)
        events = await _started(worker, job, request)
        return _sse(completion.stream(events), job) if body.stream else await completion.whole(events)

    @app.post("/v1/messages")
    async def messages(body: schemas.Message, request: Request):
        media = MediaReader(settings.allow_local_files)
        ours = _guarded(media, lambda: anthropic_messages(body.system, body.messages, media))
        tools = [{"type": "function", "function": {"name": t.get("name"), "description": t.get("description", ""),
                                                   "parameters": t.get("input_schema") or {}}}
                 for t in body.tools or []]
        job = Job(ours, _options(body, body.max_tokens, body.stop_sequences or []), time.monotonic() + settings.timeout,
                  media, tools or None, _thinking(None, body.thinking))
        reply = AnthropicMessage(worker.processor.tokenizer, settings.model_name, body)
        events = await _started(worker, job, request)
        return _sse(reply.stream(events), job, anthropic=True) if body.stream else await reply.whole(events)

    return app


def _authorized(request: Request, key: str) -> bool:
    bearer = request.headers.get("authorization", "")
    return bearer == f"Bearer {key}" or request.headers.get("x-api-key") == key


def _error(request: Request, status: int, kind: str, message: str) -> JSONResponse:
    if request.url.path == "/v1/messages":
        return JSONResponse({"type": "error", "error": {"type": kind, "message": message}}, status_code=status)
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}},
                        status_code=status)


def _only_one(n: int) -> None:
    if n != 1:
        raise HTTPException(400, "Only n=1 is supported: one choice per request.")


def _stops(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def _thinking(effort: str | None, switch: bool | dict | None) -> bool:
    if isinstance(switch, dict):
        return switch.get("type") == "enabled"
    if switch is not None:
        return bool(switch)
    return effort not in (None, "none", "minimal")


def _options(body: schemas.Sampling, max_tokens: int, stop: list[str]) -> dict[str, Any]:
    return {"max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
            "min_p": body.min_p, "seed": body.seed, "presence_penalty": body.presence_penalty,
            "frequency_penalty": body.frequency_penalty, "repetition_penalty": body.repetition_penalty,
            "stop": stop}


def _guarded(media: MediaReader, convert: Callable):
    try:
        return convert()
    except BaseException:
        media.close()
        raise


async def _started(worker: Worker, job: Job, request: Request) -> AsyncIterator[Any]:
    """Queue the job and wait for its first response, so that an error before it (a bad image, a
    prompt past the context) is still an HTTP 4xx -> the job's responses, that first one included."""
    try:
        worker.submit(job)
    except Busy:
        if job.media is not None:
            job.media.close()
        raise
    events = _events(job)
    try:
        first = await events.__anext__()
    except StopAsyncIteration:
        first = None

    async def responses():
        try:
            if first is not None:
                yield first
                async for event in events:
                    if await request.is_disconnected():
                        return
                    yield event
        finally:
            job.cancelled.set()

    return responses()


async def _events(job: Job) -> AsyncIterator[Any]:
    """The job's GenerationResponses until it is done; an error it hit is raised here."""
    try:
        while True:
            event = await job.events.get()
            if event is DONE:
                return
            if isinstance(event, BaseException):
                raise event
            yield event
    finally:
        job.cancelled.set()


def _sse(chunks: AsyncIterator[dict], job: Job, anthropic: bool = False) -> StreamingResponse:
    async def body():
        try:
            async for chunk in chunks:
                name = f"event: {chunk['type']}\n" if anthropic else ""
                yield f"{name}data: {json.dumps(chunk)}\n\n"
        except Exception as e:  # after the headers went out, an error can only be an event
            message = str(e) if isinstance(e, Gemma4UError) else f"Internal error ({type(e).__name__})."
            error = {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
            yield (f"event: error\ndata: {json.dumps(error)}\n\n" if anthropic
                   else f"data: {json.dumps({'error': {'message': message, 'type': 'invalid_request_error'}})}\n\n")
        finally:
            job.cancelled.set()
        if not anthropic:
            yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


def _usage(last, cached: bool = True) -> dict:
    usage = {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.generation_tokens,
             "total_tokens": last.prompt_tokens + last.generation_tokens}
    if cached:
        usage["prompt_tokens_details"] = {"cached_tokens": last.prompt_tokens - last.prefilled_tokens}
    return usage


def _finish(last, reply: Reply | None = None) -> str:
    if reply is not None and reply.tool_calls:
        return "tool_calls"
    return last.finish_reason or "length"


class OpenAIChat:
    """GenerationResponses -> a chat.completion, or chat.completion.chunk events."""

    def __init__(self, tokenizer, model: str, body: schemas.ChatCompletion):
        self.tokenizer, self.model, self.body = tokenizer, model, body
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.reply = Reply(tokenizer)

    def _logprobs(self, response) -> list[dict]:
        if not self.body.logprobs or response.token is None:
            return []
        logprobs = response.logprobs.astype(mx.float32)
        entry = self._entry(response.token, logprobs)
        k = self.body.top_logprobs or 0
        top = mx.argpartition(-logprobs, k - 1)[:k].tolist() if k else []
        entry["top_logprobs"] = sorted((self._entry(t, logprobs) for t in top), key=lambda e: -e["logprob"])
        return [entry]

    def _entry(self, token: int, logprobs: mx.array) -> dict:
        text = self.tokenizer.decode([token])
        return {"token": text, "logprob": logprobs[token].item(), "bytes": list(text.encode())}

    def _chunk(self, delta: dict, finish: str | None = None, logprobs: list | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "finish_reason": finish,
                  "logprobs": {"content": logprobs} if logprobs else None}
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [choice]}

    async def stream(self, responses: AsyncIterator) -> AsyncIterator[dict]:
        yield self._chunk({"role": "assistant", "content": ""})
        last, index = None, 0
        async for last in responses:
            delta = self.reply.add(last.token, last.text)
            out: dict[str, Any] = {}
            if delta.content:
                out["content"] = delta.content
            if delta.reasoning:
                out["reasoning_content"] = delta.reasoning
            if delta.tool_calls:
                out["tool_calls"] = [_openai_call(c, index + i) for i, c in enumerate(delta.tool_calls)]
                index += len(delta.tool_calls)
            logprobs = self._logprobs(last)
            if out or logprobs:
                yield self._chunk(out, logprobs=logprobs)
        if last is not None:
            yield self._chunk({}, _finish(last, self.reply))
            if self.body.stream_options and self.body.stream_options.include_usage:
                yield {**self._chunk({}), "choices": [], "usage": _usage(last)}

    async def whole(self, responses: AsyncIterator) -> dict:
        last, logprobs = None, []
        async for last in responses:
            self.reply.add(last.token, last.text)
            logprobs += self._logprobs(last)
        message: dict[str, Any] = {"role": "assistant", "content": self.reply.content}
        if self.reply.reasoning:
            message["reasoning_content"] = self.reply.reasoning
        if self.reply.tool_calls:
            message["tool_calls"] = [_openai_call(c, i) for i, c in enumerate(self.reply.tool_calls)]
        choice = {"index": 0, "message": message, "finish_reason": _finish(last, self.reply),
                  "logprobs": {"content": logprobs} if self.body.logprobs else None}
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [choice], "usage": _usage(last)}


def _openai_call(call: dict, index: int) -> dict:
    return {"index": index, "id": call["id"], "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}


class OpenAICompletion:
    """GenerationResponses -> a text_completion (the prompt is used verbatim, no chat template)."""

    def __init__(self, model: str, body: schemas.Completion):
        self.model, self.body = model, body
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def _body(self, text: str, finish: str | None) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

    async def stream(self, responses: AsyncIterator) -> AsyncIterator[dict]:
        last = None
        async for last in responses:
            if last.text:
                yield self._body(last.text, None)
        if last is not None:
            yield self._body("", _finish(last))
            if self.body.stream_options and self.body.stream_options.include_usage:
                yield {**self._body("", None), "choices": [], "usage": _usage(last, cached=False)}

    async def whole(self, responses: AsyncIterator) -> dict:
        text, last = "", None
        async for last in responses:
            text += last.text
        return {**self._body(text, _finish(last)), "usage": _usage(last, cached=False)}


class AnthropicMessage:
    """GenerationResponses -> an Anthropic message, or its streaming events."""

    def __init__(self, tokenizer, model: str, body: schemas.Message):
        self.model, self.body = model, body
        self.id = f"msg_{uuid.uuid4().hex[:24]}"
        self.reply = Reply(tokenizer)

    def _stop(self, last) -> tuple[str, str | None]:
        if self.reply.tool_calls:
            return "tool_use", None
        stops = self.body.stop_sequences or []
        if last.finish_reason == "stop" and stops and last.token not in self.reply.tokenizer.eos_token_ids:
            return "stop_sequence", stops[0] if len(stops) == 1 else None
        return ANTHROPIC_STOP.get(last.finish_reason or "length", "end_turn"), None

    def _usage(self, last) -> dict:
        return {"input_tokens": last.prompt_tokens, "output_tokens": last.generation_tokens,
                "cache_read_input_tokens": last.prompt_tokens - last.prefilled_tokens}

    def _start(self) -> dict:
        return {"type": "message_start", "message": {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}}

    async def stream(self, responses: AsyncIterator) -> AsyncIterator[dict]:
        yield self._start()
        index, open_kind, last = 0, None, None
        async for last in responses:
            delta = self.reply.add(last.token, last.text)
            for kind, text in (("thinking", delta.reasoning), ("text", delta.content)):
                if not text:
                    continue
                if open_kind != kind:
                    if open_kind is not None:
                        yield {"type": "content_block_stop", "index": index}
                        index += 1
                    open_kind = kind
                    yield {"type": "content_block_start", "index": index,
                           "content_block": {"type": kind, kind: ""} if kind == "thinking" else
                           {"type": "text", "text": ""}}
                key = "thinking_delta" if kind == "thinking" else "text_delta"
                yield {"type": "content_block_delta", "index": index,
                       "delta": {"type": key, "thinking" if kind == "thinking" else "text": text}}
            for call in delta.tool_calls:
                if open_kind is not None:
                    yield {"type": "content_block_stop", "index": index}
                    index += 1
                open_kind = None
                yield {"type": "content_block_start", "index": index, "content_block": {
                    "type": "tool_use", "id": call["id"], "name": call["name"], "input": {}}}
                yield {"type": "content_block_delta", "index": index,
                       "delta": {"type": "input_json_delta", "partial_json": json.dumps(call["arguments"])}}
                yield {"type": "content_block_stop", "index": index}
                index += 1
        if open_kind is not None:
            yield {"type": "content_block_stop", "index": index}
        if last is not None:
            reason, sequence = self._stop(last)
            yield {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                   "usage": {"output_tokens": last.generation_tokens}}
        yield {"type": "message_stop"}

    async def whole(self, responses: AsyncIterator) -> dict:
        last = None
        async for last in responses:
            self.reply.add(last.token, last.text)
        content: list[dict] = []
        if self.reply.reasoning:
            content.append({"type": "thinking", "thinking": self.reply.reasoning, "signature": ""})
        if self.reply.content or not self.reply.tool_calls:
            content.append({"type": "text", "text": self.reply.content})
        content += [{"type": "tool_use", "id": c["id"], "name": c["name"], "input": c["arguments"]}
                    for c in self.reply.tool_calls]
        reason, sequence = self._stop(last)
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": reason, "stop_sequence": sequence, "usage": self._usage(last)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The serve subcommand's flags."""
    from ..cli import add_model_args

    add_model_args(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    parser.add_argument("--api-key", help="require this key (Authorization: Bearer KEY, or x-api-key: KEY)")
    parser.add_argument("--allowed-origins", nargs="*", metavar="ORIGIN",
                        help="browser origins allowed to call the API (CORS); none by default")
    parser.add_argument("--allow-local-files", action="store_true",
                        help="let requests name media by local path (off: data: URIs and http(s) URLs only)")
    parser.add_argument("--draft-model", metavar="PATH",
                        help="a Gemma 4 MTP assistant for speculative decoding (the batch drafts together, each "
                             "request keeping its own accepted drafts)")
    parser.add_argument("--max-concurrency", type=int, default=8,
                        help="requests decoded together (batched; default 8); more wait in the queue")
    parser.add_argument("--max-queue", type=int, default=16,
                        help="requests that may wait for the model; more get HTTP 429 (default 16)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds a request may generate before it is cut off (default 600)")


def run(args: argparse.Namespace) -> None:
    import uvicorn

    from ..cli import load_from_args

    name = "demo" if args.demo else str(args.model)
    drafter = None
    if args.draft_model:
        from ..draft import load_draft_model

        drafter = lambda: load_draft_model(args.draft_model, check_memory=not args.no_memory_check)  # noqa: E731
    worker = Worker(lambda: load_from_args(args), max_queue=args.max_queue, max_concurrency=args.max_concurrency,
                    load_drafter=drafter)
    app = create_app(worker, Settings(name, args.api_key, args.allow_local_files, args.timeout), args.allowed_origins)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
