"""The HTTP app (FastAPI on uvicorn): OpenAI's /v1/chat/completions, /v1/completions and
/v1/models, Anthropic's /v1/messages, and /health.

A request's way: guards.py (Host, CORS, key, body size) -> its schema (pydantic) -> its settings
checked (generate.check_settings) -> prepared on the pool (pool.py: media fetched and decoded under
the limits of media.py and fetch.py, prompt tokenized) -> queued for the engine's thread
(worker.py) -> its tokens streamed back in the API's shape (responses.py). Every error is a JSON
body in the API's own shape with a 4xx code (5xx only for a fault of ours), never a traceback, and
ends that request alone. It binds 127.0.0.1 unless told otherwise.

Message text is text: a control token spelled in a message stays those characters. A
/v1/completions prompt is used verbatim, special-token strings included.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import StreamingResponse

from mlx_gemma4u.errors import Gemma4UError
from mlx_gemma4u.generation.generate import check_settings, prepare_arrays
from mlx_gemma4u.serve import schemas
from mlx_gemma4u.serve.errors import Fault
from mlx_gemma4u.serve.fetch import FetchPolicy
from mlx_gemma4u.serve.guards import LOOPBACK_NAMES, AccessLog, ApiKey, BodyLimit, HostCheck, error_response
from mlx_gemma4u.serve.media import MediaLimits, MediaReader
from mlx_gemma4u.serve.messages import anthropic_messages, openai_messages
from mlx_gemma4u.serve.pool import PreparePool
from mlx_gemma4u.serve.responses import AnthropicMessage, OpenAIChat, OpenAICompletion
from mlx_gemma4u.serve.worker import DONE, Job, Worker

log = logging.getLogger(__name__)
PREPARE_THREADS = 4  # requests prepared at once; fetches wait on the network, decoding on the CPU


@dataclass(frozen=True)
class Settings:
    model_name: str
    timeout: float
    max_tokens: int  # a chat reply's length when the request names none
    media: MediaLimits
    api_key: str | None = None
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: frozenset[str] | None = None  # None: any Host header
    max_body_bytes: int = 32 << 20


def create_app(worker: Worker, pool: PreparePool, settings: Settings) -> FastAPI:
    app = FastAPI(title="mlx-gemma4u", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(ApiKey, key=settings.api_key)
    if settings.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(HostCheck, allowed=settings.allowed_hosts)
    app.add_middleware(AccessLog)
    _handle_errors(app)
    tokenizer = worker.processor.tokenizer

    async def start(prepare: Callable[[MediaReader], dict], options: dict, top_logprobs: int | None,
                    request: Request) -> AsyncIterator:
        check_settings(**options)
        inputs = await pool.run(lambda: _prepared(prepare, settings.media))
        job = Job(inputs, options, time.monotonic() + settings.timeout, top_logprobs)
        return await _started(worker, job, request)

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
        thinking = _thinking(body.reasoning_effort, body.thinking)

        def prepare(media: MediaReader) -> dict:
            return prepare_arrays(worker.processor, openai_messages(body.messages, media), enable_thinking=thinking,
                                  tools=body.tools)

        given = [n for n in (body.max_completion_tokens, body.max_tokens) if n is not None]
        options = _options(body, given[0] if given else settings.max_tokens, body.stop)
        tokens = await start(prepare, options, (body.top_logprobs or 0) if body.logprobs else None, request)
        chat = OpenAIChat(tokenizer, settings.model_name, body)
        return _sse(chat.stream(tokens)) if body.stream else await chat.whole(tokens)

    @app.post("/v1/completions")
    async def completions(body: schemas.Completion, request: Request):
        _only_one(body.n)
        tokens = await start(lambda media: prepare_arrays(worker.processor, body.prompt),
                             _options(body, body.max_tokens, body.stop), body.logprobs, request)
        completion = OpenAICompletion(tokenizer, settings.model_name, body)
        return _sse(completion.stream(tokens)) if body.stream else await completion.whole(tokens)

    @app.post("/v1/messages")
    async def messages(body: schemas.Message, request: Request):
        tools = [{"type": "function", "function": {"name": t.get("name"), "description": t.get("description", ""),
                                                   "parameters": t.get("input_schema") or {}}}
                 for t in body.tools or []]
        thinking = _thinking(None, body.thinking)

        def prepare(media: MediaReader) -> dict:
            return prepare_arrays(worker.processor, anthropic_messages(body.system, body.messages, media),
                                  enable_thinking=thinking, tools=tools or None)

        tokens = await start(prepare, _options(body, body.max_tokens, body.stop_sequences), None, request)
        reply = AnthropicMessage(tokenizer, settings.model_name, body)
        return _sse(reply.stream(tokens), anthropic=True) if body.stream else await reply.whole(tokens)

    return app


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


def _options(body: schemas.Sampling, max_tokens: int, stop: str | list[str] | None) -> dict[str, Any]:
    """A request's settings under the engine's names (generate.check_settings')."""
    return {"max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
            "min_p": body.min_p, "seed": body.seed, "presence_penalty": body.presence_penalty,
            "frequency_penalty": body.frequency_penalty, "repetition_penalty": body.repetition_penalty,
            "stop": [stop] if isinstance(stop, str) else list(stop or [])}


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
        try:
            if first is not None:
                yield first
                async for event in events:
                    if await request.is_disconnected():
                        return
                    yield event
        finally:
            job.cancelled.set()

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


def _sse(chunks: AsyncIterator[dict], anthropic: bool = False) -> StreamingResponse:
    async def body():
        try:
            async for chunk in chunks:
                name = f"event: {chunk['type']}\n" if anthropic else ""
                yield f"{name}data: {json.dumps(chunk)}\n\n"
        except Exception as e:  # after the headers went out, an error can only be an event
            message = str(e) if isinstance(e, Gemma4UError) else f"Internal error ({type(e).__name__})."
            kind = getattr(e, "kind", "invalid_request_error")
            error = {"type": "error", "error": {"type": kind, "message": message}}
            yield (f"event: error\ndata: {json.dumps(error)}\n\n" if anthropic
                   else f"data: {json.dumps({'error': {'message': message, 'type': kind}})}\n\n")
        if not anthropic:
            yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The serve subcommand's flags."""
    from mlx_gemma4u.cli.main import add_model_args

    add_model_args(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    parser.add_argument("--api-key", help="require this key (Authorization: Bearer KEY, or x-api-key: KEY)")
    parser.add_argument("--allowed-origins", nargs="*", metavar="ORIGIN", default=[],
                        help="browser origins allowed to call the API (CORS); none by default")
    parser.add_argument("--allowed-hosts", nargs="*", metavar="HOST", default=[],
                        help="Host header names to answer besides the bound address (and localhost when bound to "
                             "loopback); a server bound to 0.0.0.0 answers any unless some are named")
    parser.add_argument("--draft-model", metavar="PATH",
                        help="a Gemma 4 MTP assistant for speculative decoding (the batch drafts together, each "
                             "request keeping its own accepted drafts); 'demo' for a random one to try the flag")
    parser.add_argument("--max-tokens", type=int, metavar="N",
                        help="a chat reply's length when the request sets none (default 1024; 32 with --demo)")
    parser.add_argument("--max-concurrency", type=int, default=8,
                        help="requests decoded together (batched; default 8); more wait in the queue")
    parser.add_argument("--max-queue", type=int, default=16,
                        help="requests that may wait to be prepared, and again to be decoded; more get HTTP 429 "
                             "(default 16)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds a request may generate before it is cut off (finish_reason 'timeout'; "
                             "default 600)")
    limits = parser.add_argument_group("limits on what a request may bring")
    limits.add_argument("--max-request-mb", type=float, default=32.0, help="request body size (default 32 MB)")
    limits.add_argument("--max-image-pixels", type=int, default=MediaLimits.image_pixels,
                        help=f"pixels of one image, read from its header before decoding "
                             f"(default {MediaLimits.image_pixels:,})")
    limits.add_argument("--max-audio-seconds", type=float, default=MediaLimits.audio_seconds,
                        help=f"length of one audio clip (default {MediaLimits.audio_seconds:g} s)")
    limits.add_argument("--max-video-seconds", type=float, default=MediaLimits.video_seconds,
                        help=f"length of one video (default {MediaLimits.video_seconds:g} s)")
    limits.add_argument("--max-video-frames", type=int, default=MediaLimits.video_frames,
                        help=f"frames of one video (default {MediaLimits.video_frames:,})")
    limits.add_argument("--max-fetch-mb", type=float, default=FetchPolicy.max_bytes / 1e6,
                        help=f"bytes of one fetched URL or local file (default {FetchPolicy.max_bytes / 1e6:g} MB)")
    limits.add_argument("--fetch-timeout", type=float, default=FetchPolicy.seconds,
                        help=f"seconds for one whole URL fetch, redirects included (default {FetchPolicy.seconds:g})")
    limits.add_argument("--allow-private-urls", action="store_true",
                        help="fetch media URLs on loopback, private and link-local addresses too (off: public "
                             "addresses only, so that a request cannot reach this machine's or its network's services)")
    limits.add_argument("--allow-local-files", action="store_true",
                        help="let requests name media by local path (off: data: URIs and http(s) URLs only)")


def _settings(args: argparse.Namespace) -> Settings:
    policy = FetchPolicy(allow_private=args.allow_private_urls, max_bytes=int(args.max_fetch_mb * 1e6),
                         seconds=args.fetch_timeout)
    media = MediaLimits(image_pixels=args.max_image_pixels, audio_seconds=args.max_audio_seconds,
                        video_seconds=args.max_video_seconds, video_frames=args.max_video_frames,
                        allow_local_files=args.allow_local_files, fetch=policy)
    from mlx_gemma4u.cli.main import DEMO_MAX_TOKENS

    return Settings(model_name="demo" if args.demo else str(args.model), timeout=args.timeout,
                    max_tokens=args.max_tokens or (DEMO_MAX_TOKENS if args.demo else 1024), media=media,
                    api_key=args.api_key, allowed_origins=tuple(args.allowed_origins),
                    allowed_hosts=_allowed_hosts(args.host, args.allowed_hosts),
                    max_body_bytes=int(args.max_request_mb * 1e6))


def _allowed_hosts(bound: str, named: list[str]) -> frozenset[str] | None:
    """The Host names to answer: the bound address, localhost's names when it is loopback, and the
    named ones; None (any) for a wildcard bind with none named."""
    try:
        address = ipaddress.ip_address(bound)
    except ValueError:
        address = None
    wildcard = address is not None and address.is_unspecified
    if wildcard and not named:
        return None
    hosts = {h.lower() for h in named} | ({bound.lower()} if not wildcard else set())
    if bound == "localhost" or (address is not None and address.is_loopback):
        hosts |= LOOPBACK_NAMES
    return frozenset(hosts)


class _Server(uvicorn.Server):
    """uvicorn's server, telling where it listens once it does, and ending every open request with
    an error at the first SIGTERM or Ctrl-C (a hung fetch included), so that it stops in seconds."""

    def __init__(self, config: uvicorn.Config, stop: Callable[[], None], banner: str):
        super().__init__(config)
        self._stop, self._banner, self._loop = stop, banner, None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        self._loop = asyncio.get_running_loop()
        if self.started:
            print(self._banner, file=sys.stderr, flush=True)

    def handle_exit(self, sig, frame) -> None:
        if self._loop is not None and not self.should_exit:
            self._loop.call_soon_threadsafe(self._stop)
        super().handle_exit(sig, frame)


def run(args: argparse.Namespace) -> None:
    from mlx_gemma4u.cli.main import load_from_args

    settings = _settings(args)
    drafter = None
    if args.draft_model:
        from mlx_gemma4u.models.drafter import load_draft_model

        drafter = lambda: load_draft_model(args.draft_model, check_memory=not args.no_memory_check)  # noqa: E731
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    worker = Worker(lambda: load_from_args(args), max_queue=args.max_queue, max_concurrency=args.max_concurrency,
                    load_drafter=drafter)
    pool = PreparePool(PREPARE_THREADS, backlog=args.max_queue)

    def stop() -> None:
        pool.stop()
        worker.stop()

    config = uvicorn.Config(create_app(worker, pool, settings), host=args.host, port=args.port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=5)
    host = f"[{args.host}]" if ":" in args.host else args.host
    banner = (f"Serving {settings.model_name} on http://{host}:{args.port} (OpenAI /v1/chat/completions, "
              "/v1/completions; Anthropic /v1/messages); Ctrl-C stops.")
    _Server(config, stop, banner).run()
