"""The HTTP app (FastAPI on uvicorn): OpenAI's /v1/chat/completions, /v1/completions and
/v1/models, Anthropic's /v1/messages, and /health.

A request's way: guards.py (Host, CORS, key, body size) -> its schema (pydantic) -> its
SamplingParams (checked as they are built) -> prepared on the pool (pool.py: media fetched and decoded under
the limits of media.py and fetch.py, prompt tokenized) -> queued for the engine's thread
(worker.py) -> its tokens streamed back in the API's shape (responses.py). Every error is a JSON
body in the API's own shape with a 4xx code (5xx only for a fault of ours), never a traceback, and
ends that request alone. It binds 127.0.0.1 unless told otherwise.

Message text is text: a control token spelled in a message stays those characters. A
/v1/completions prompt is used verbatim, special-token strings included.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import HTMLResponse, Response, StreamingResponse

from mlx_gemma4u.errors import Gemma4UError, InputError
from mlx_gemma4u.generation.constraints import Constraint, ll_tokenizer
from mlx_gemma4u.generation.inputs import prepare_arrays
from mlx_gemma4u.generation.params import SamplingParams
from mlx_gemma4u.serve import schemas
from mlx_gemma4u.serve.errors import Fault
from mlx_gemma4u.serve.guards import AccessLog, ApiKey, BodyLimit, HostCheck, error_response
from mlx_gemma4u.serve.media import MediaLimits, MediaReader
from mlx_gemma4u.serve.messages import anthropic_messages, openai_messages, responses_messages
from mlx_gemma4u.serve.metrics import CONTENT_TYPE
from mlx_gemma4u.serve.pool import PreparePool
from mlx_gemma4u.serve.responses import AnthropicMessage, OpenAIChat, OpenAICompletion, Transcript
from mlx_gemma4u.serve.responses_api import ResponseReply, ResponseStore, function_tools, input_items, response_format
from mlx_gemma4u.serve.worker import DONE, Job, Token, Worker

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("chat.html")  # the chat page: one static file, its CSS and JS inline
PREPARE_THREADS = 4  # requests prepared at once; fetches wait on the network, decoding on the CPU


@dataclass(frozen=True)
class Settings:
    model_name: str
    timeout: float
    sampling: dict  # serve's flags (max_tokens: a chat reply's length when the request names none, kv_bits, ...)
    media: MediaLimits
    api_key: str | None = None
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: frozenset[str] | None = None  # None: any Host header
    max_body_bytes: int = 32 << 20
    ui: bool = True  # the chat page at /


def create_app(worker: Worker, pool: PreparePool, settings: Settings) -> FastAPI:
    app = FastAPI(title="mlx-gemma4u", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(ApiKey, key=settings.api_key)
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.allowed_origins), allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(HostCheck, allowed=settings.allowed_hosts)
    app.add_middleware(AccessLog, metrics=worker.metrics)
    _handle_errors(app)
    tokenizer = worker.processor.tokenizer
    store = ResponseStore()
    # what a request leaves out: serve's flags, over the checkpoint's generation_config.json
    defaults = SamplingParams(**{**worker.processor.sampling_defaults, **settings.sampling})

    async def start(
        prepare: Callable[[MediaReader], dict],
        params: SamplingParams,
        top_logprobs: int | None,
        request: Request,
        cancelled: threading.Event | None = None,
    ) -> AsyncIterator:
        """Prepare the request on the pool, queue it, wait for its first token -> its tokens
        (`cancelled`: an event that ends it, besides its client leaving)."""
        if params.response_format is not None:  # llguidance's view of the vocabulary, built once, off the step loop
            await pool.run(lambda: ll_tokenizer(tokenizer, worker.model.config.text.vocab_size))
        inputs = await pool.run(lambda: _prepared(prepare, settings.media))
        job = Job(inputs, params, time.monotonic() + settings.timeout, top_logprobs)
        job.cancelled = cancelled or job.cancelled
        return await _started(worker, job, request)

    if settings.ui:
        page_html = PAGE.read_text(encoding="utf-8")

        @app.get("/")
        async def page():
            return HTMLResponse(page_html)

    @app.get("/health")
    async def health():
        return {"status": "ok", "loaded": worker.loaded}

    @app.get("/metrics")
    async def metrics():
        return Response(worker.metrics.text(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": settings.model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "mlx-gemma4u",
                    "loaded": worker.loaded,
                }
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(body: schemas.ChatCompletion, request: Request):
        _only_one(body.n)
        thinking = _thinking(body.reasoning_effort, body.thinking)

        def prepare(media: MediaReader) -> dict:
            return prepare_arrays(
                worker.processor, openai_messages(body.messages, media), enable_thinking=thinking, tools=body.tools
            )

        given = [n for n in (body.max_completion_tokens, body.max_tokens) if n is not None]
        params = _params(
            defaults,
            body,
            given[0] if given else None,
            body.stop,
            enable_thinking=thinking,
            response_format=_answer_format(body.response_format, body.tools, body.tool_choice),
        )
        tokens = await start(prepare, params, (body.top_logprobs or 0) if body.logprobs else None, request)
        chat = OpenAIChat(tokenizer, settings.model_name, body)
        return _sse(chat.stream(tokens)) if body.stream else await chat.whole(tokens)

    @app.post("/v1/completions")
    async def completions(body: schemas.Completion, request: Request):
        _only_one(body.n)
        tokens = await start(
            lambda media: prepare_arrays(worker.processor, body.prompt),
            _params(defaults, body, body.max_tokens, body.stop),
            body.logprobs,
            request,
        )
        completion = OpenAICompletion(tokenizer, settings.model_name, body)
        return _sse(completion.stream(tokens)) if body.stream else await completion.whole(tokens)

    def anthropic_prompt(body: schemas.MessagePrompt) -> tuple[Callable[[MediaReader], dict], list[dict], bool]:
        """An Anthropic request's prompt -> (its prepare function, its tools in OpenAI's form, thinking)."""
        tools = [
            {
                "type": "function",
                "function": {
                    "name": t.get("name"),
                    "description": t.get("description", ""),
                    "parameters": t.get("input_schema") or {},
                },
            }
            for t in body.tools or []
        ]
        thinking = _thinking(None, body.thinking)

        def prepare(media: MediaReader) -> dict:
            return prepare_arrays(
                worker.processor,
                anthropic_messages(body.system, body.messages, media),
                enable_thinking=thinking,
                tools=tools or None,
            )

        return prepare, tools, thinking

    @app.post("/v1/responses")
    async def create_response(body: schemas.ResponseCreate, request: Request):
        if body.background:
            raise InputError("Background responses are not supported: stream the response instead.")
        items = store.get_for_follow_up(body.previous_response_id) if body.previous_response_id else []
        items = items + input_items(body.input)
        tools = function_tools(body.tools)
        thinking = _thinking((body.reasoning or {}).get("effort"), None)

        def prepare(media: MediaReader) -> dict:
            messages = responses_messages(body.instructions, items, media)
            return prepare_arrays(worker.processor, messages, enable_thinking=thinking, tools=tools or None)

        params = _params(
            defaults,
            body,
            body.max_output_tokens,
            None,
            enable_thinking=thinking,
            response_format=_answer_format(response_format(body.text), tools, body.tool_choice),
        )
        reply = ResponseReply(tokenizer, settings.model_name, body, items)
        tokens = await start(prepare, params, None, request, reply.cancelled)
        if body.store:
            store.add(reply)
        return _sse(reply.stream(tokens), style="responses") if body.stream else await reply.whole(tokens)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str):
        return store.get(response_id).snapshot()

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str):
        store.delete(response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel_response(response_id: str):
        return store.cancel(response_id).snapshot()

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(body: schemas.MessagePrompt):
        prepare, _, _ = anthropic_prompt(body)
        inputs = await pool.run(lambda: _prepared(prepare, settings.media))
        return {"input_tokens": int(inputs["input_ids"].shape[1])}

    @app.post("/v1/messages")
    async def messages(body: schemas.Message, request: Request):
        prepare, tools, thinking = anthropic_prompt(body)
        tokens = await start(
            prepare,
            _params(
                defaults,
                body,
                body.max_tokens,
                body.stop_sequences,
                enable_thinking=thinking,
                response_format=_answer_format(None, tools, body.tool_choice),
            ),
            None,
            request,
        )
        reply = AnthropicMessage(tokenizer, settings.model_name, body)
        return _sse(reply.stream(tokens), style="anthropic") if body.stream else await reply.whole(tokens)

    async def transcribe(request: Request, task: str):
        """OpenAI's audio endpoints: the multipart form's audio file and settings -> its text."""
        form = await request.form()
        upload, fields = form.get("file"), {k: v for k, v in form.items() if isinstance(v, str)}
        if upload is None or isinstance(upload, str):
            raise InputError("The form needs the audio as a file field named 'file'.")
        data, name = await upload.read(), upload.filename or "audio"
        try:
            body = schemas.Transcription(**fields)
        except ValidationError as e:
            first = e.errors()[0]
            raise InputError(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
        instruction = TASKS[task] + (f" The speech is in {body.language}." if body.language else "")
        instruction += f" Context: {body.prompt}" if body.prompt else ""

        clip: dict = {}  # the audio's length, for verbose_json

        def prepare(media: MediaReader) -> dict:
            part = media.audio_bytes(data, name.rsplit(".", 1)[-1], "file")
            samples, rate = part["audio"]
            clip["seconds"] = len(samples) / rate
            content = [part, {"type": "text", "text": instruction}]
            return prepare_arrays(worker.processor, [{"role": "user", "content": content}])

        params = _params(defaults, body, None, None)
        tokens = await start(prepare, params, None, request)
        reply = Transcript(body, task, clip)
        return _sse(reply.stream(tokens)) if body.stream else await reply.whole(tokens)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        return await transcribe(request, "transcribe")

    @app.post("/v1/audio/translations")
    async def translations(request: Request):
        return await transcribe(request, "translate")

    return app


TASKS = {"transcribe": "Transcribe this audio.", "translate": "Translate this audio into English."}


def _handle_errors(app: FastAPI) -> None:
    """Every error as JSON in the API's shape: the request's own with 4xx, ours with 500."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            message = f"The request body is not valid JSON ({first.get('ctx', {}).get('error', 'unreadable')})."
        else:
            where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
            message = f"{where or 'body'}: {first.get('msg', 'invalid')}"
        return error_response(request.url.path, 400, "invalid_request_error", message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error_response(request.url.path, exc.status_code, "invalid_request_error", str(exc.detail))

    @app.exception_handler(Gemma4UError)
    async def refused(request: Request, exc: Gemma4UError):
        status, kind = getattr(exc, "status", 400), getattr(exc, "kind", "invalid_request_error")
        return error_response(request.url.path, status, kind, str(exc))

    @app.exception_handler(Exception)
    async def fault(request: Request, exc: Exception):
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(request.url.path, 500, "api_error", f"Internal error ({type(exc).__name__}).")


def _prepared(prepare: Callable[[MediaReader], dict], limits: MediaLimits) -> dict:
    """prepare(a MediaReader) on a pool thread, its temporary files removed after, its errors
    naming none of them."""
    media = MediaReader(limits)
    try:
        return prepare(media)
    except Gemma4UError as e:
        raise type(e)(media.hide_paths(str(e))) from None
    except Exception as e:  # what the processor raised for this request's content
        log.error("preparing a request failed", exc_info=e)
        raise Fault(f"Internal error while reading the request's content ({type(e).__name__}).") from None
    finally:
        media.close()


def _only_one(n: int) -> None:
    if n != 1:
        raise HTTPException(400, "Only n=1 is supported: one choice per request.")


def _thinking(effort: str | None, switch: bool | dict | None) -> bool:
    if isinstance(switch, dict):
        return switch.get("type") == "enabled"
    if switch is not None:
        return bool(switch)
    return effort not in (None, "none", "minimal")


def _params(
    defaults: SamplingParams, body: schemas.Sampling, max_tokens: int | None, stop: str | list[str] | None, **more
) -> SamplingParams:
    """A request's SamplingParams over the server's defaults (only what the request sets): a bad
    value is a 400 naming it."""
    sampling = {name: getattr(body, name) for name in schemas.SAMPLING if name in body.model_fields_set}
    return defaults.replace(
        **sampling,
        **more,
        stop=[stop] if isinstance(stop, str) else list(stop or []),
        **({"max_tokens": max_tokens} if max_tokens is not None else {}),
    )


def _answer_format(response_format: dict | None, tools: list[dict] | None, tool_choice) -> Constraint | None:
    """What the reply is held to: the response format, or else what tool_choice asks of the calls
    (with tools and no tool_choice: "auto", a started call held to its function's schema)."""
    calls = Constraint.tool_choice(tools, tool_choice)
    if response_format is None:
        return calls
    if calls is not None and calls.opens is None:
        raise InputError("Give either response_format or a tool_choice that forces or forbids calls, not both.")
    return Constraint.of(response_format)


async def _started(worker: Worker, job: Job, request: Request) -> AsyncIterator[Any]:
    """Queue the job and wait for its first token, so that an error before it (a prompt past the
    context, a refused setting) is still an HTTP error -> the job's tokens, that first one included."""
    worker.submit(job)
    events = _events(job)
    try:
        first = await events.__anext__()
    except StopAsyncIteration:
        first = None

    async def tokens():
        last = first
        try:
            if first is not None:
                yield first
                async for event in events:
                    if await request.is_disconnected():
                        return
                    last = event
                    yield event
        finally:
            job.cancelled.set()
            if isinstance(last, Token):  # for the access log's line
                request.state.tokens = (last.prompt_tokens, last.generation_tokens)

    return tokens()


async def _events(job: Job) -> AsyncIterator[Any]:
    """The job's tokens until it is done; an error it hit is raised here."""
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


def _sse(chunks: AsyncIterator[dict], style: str = "openai") -> StreamingResponse:
    """Server-sent events in an API's style: "openai" (chat, completions: data lines, then [DONE]),
    "anthropic" and "responses" (each event named by its type)."""
    named = style != "openai"

    async def body():
        try:
            async for chunk in chunks:
                name = f"event: {chunk['type']}\n" if named else ""
                yield f"{name}data: {json.dumps(chunk)}\n\n"
        except Exception as e:  # after the headers went out, an error can only be an event
            message = str(e) if isinstance(e, Gemma4UError) else f"Internal error ({type(e).__name__})."
            kind = getattr(e, "kind", "invalid_request_error")
            error = {
                "openai": {"error": {"message": message, "type": kind}},
                "anthropic": {"type": "error", "error": {"type": kind, "message": message}},
                "responses": {"type": "error", "code": kind, "message": message, "param": None},
            }[style]
            name = "event: error\n" if named else ""
            yield f"{name}data: {json.dumps(error)}\n\n"
        if not named:
            yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


class _Server(uvicorn.Server):
    """uvicorn's server, telling where it listens once it does, and ending every open request with
    an error at the first SIGTERM or Ctrl-C (a hung fetch included), so that it stops in seconds.
    `finish`, if given, runs once it has shut down (uvicorn then re-raises the signal: nothing
    after `run()` would)."""

    def __init__(self, config: uvicorn.Config, stop: Callable[[], None], banner: str, finish: Callable | None):
        super().__init__(config)
        self._stop, self._banner, self._finish, self._loop = stop, banner, finish, None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        self._loop = asyncio.get_running_loop()
        if self.started:
            print(self._banner, file=sys.stderr, flush=True)

    def handle_exit(self, sig, frame) -> None:
        if self._loop is not None and not self.should_exit:
            self._loop.call_soon_threadsafe(self._stop)
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        await super().shutdown(sockets)
        if self._finish is not None:
            await asyncio.to_thread(self._finish)


def serve(worker: Worker, settings: Settings, host: str, port: int, max_queue: int) -> None:
    """Answer on host:port until SIGTERM or Ctrl-C."""
    pool = PreparePool(PREPARE_THREADS, backlog=max_queue)

    def stop() -> None:
        pool.stop()
        worker.stop()

    config = uvicorn.Config(
        create_app(worker, pool, settings),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    shown = f"[{host}]" if ":" in host else host
    banner = (
        f"Serving {settings.model_name} on http://{shown}:{port} (OpenAI /v1/chat/completions, "
        "/v1/completions, /v1/responses, /v1/audio; Anthropic /v1/messages"
        + ("; the chat page at /" if settings.ui else "")
        + "); Ctrl-C stops."
    )
    # A model split across processes: its other processes hear from the worker's thread that it stopped.
    finish = (lambda: worker.join(timeout=30)) if worker.group is not None else None
    _Server(config, stop, banner, finish).run()
