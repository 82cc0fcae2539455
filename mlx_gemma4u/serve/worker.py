"""The model's worker thread: requests queue up (a bounded queue: 429 when full) and decode
together through the batching engine (batch.BatchGenerator: up to --max-concurrency sequences at
once, each with its own sampler, stop strings and limits, each getting exactly the tokens it gets
alone); their responses go back to each request's event loop as they come.

A prompt-prefix cache across requests (least recently used, bounded in bytes): a request starts
from the cached conversation that shares the longest prefix with its prompt, so a conversation's
next turn prefills only its new tokens. A request whose client went away, or whose time ran out,
leaves the batch at once.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import Gemma4UError, InputError

DONE = object()  # the event that ends a request's stream


class Busy(Gemma4UError):
    """The queue is full: the client should retry later (HTTP 429)."""


@dataclass
class Request:
    """One generation: a prompt (chat messages, ours, rendered with `tools`; or a string used as
    is) and stream_generate's keyword arguments."""

    prompt: str | list[dict]
    options: dict[str, Any]
    deadline: float
    media: Any = None  # a messages.MediaReader, closed when the request is done
    tools: list[dict] | None = None
    enable_thinking: bool = False
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.loop = asyncio.get_running_loop()

    def emit(self, event: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Worker:
    """Loads the model in its own thread (MLX arrays belong to the thread that made them, so the
    model is built where it runs) and serves the queue from there."""

    def __init__(self, load: Callable[[], tuple], max_queue: int = 16, max_concurrency: int = 8,
                 cache_bytes: int = 2 << 30, load_drafter: Callable | None = None):
        self.cache_bytes, self.max_concurrency = cache_bytes, max_concurrency
        self._load_drafter = load_drafter
        self._queue: queue.Queue = queue.Queue(max_queue)
        self._caches: list = []  # (PromptCache, the prompt it was made for), most recently used last
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        threading.Thread(target=self._run, args=(load,), name="mlx-gemma4u-worker", daemon=True).start()
        self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error

    def submit(self, request: Request) -> None:
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            raise Busy("The server is busy: too many requests are waiting; retry shortly.") from None

    def _run(self, load: Callable[[], tuple]) -> None:
        from ..batch import BatchGenerator

        try:
            self.model, self.processor = load()
            drafter = self._load_drafter() if self._load_drafter else None

            def new_generator() -> BatchGenerator:
                return BatchGenerator(self.model, self.processor, max_batch=self.max_concurrency, draft_model=drafter)

            generator = new_generator()
        except BaseException as e:  # handed to the constructor, which raises it
            self._load_error = e
            return
        finally:
            self._loaded.set()
        running: dict[int, tuple[Request, Any, str]] = {}  # uid -> (request, its cache, its prompt)
        while True:
            try:
                self._admit(generator, running, wait=generator.done)
                for uid, token, text, finish in generator.step():
                    self._hand_out(generator, running, uid, token, text, finish)
            except Exception as e:  # a fault of ours: every running request hears of it, the server goes on
                for uid in list(running):
                    running[uid][0].emit(e)
                    self._finish(running, uid)
                generator = new_generator()
            for uid, (request, _, _) in list(running.items()):
                if request.cancelled.is_set() or time.monotonic() > request.deadline:
                    generator.cancel(uid)
                    self._finish(running, uid)

    def _admit(self, generator, running: dict, wait: bool) -> None:
        """Hand the engine waiting requests while it has room (blocking for one when nothing runs);
        the rest stay in the bounded queue."""
        while len(running) < self.max_concurrency:
            try:
                request = self._queue.get(block=wait)
            except queue.Empty:
                return
            wait = False
            if request.cancelled.is_set():
                self._close(request)
                continue
            try:
                prompt, media = self._render(request)
            except Gemma4UError as e:
                request.emit(e)
                self._close(request)
                continue
            cache = self._cache_for(prompt, request.options.get("kv_bits"))
            uid = generator.submit(prompt, **media, prompt_cache=cache, **request.options)
            running[uid] = (request, cache, prompt)
            if generator.responses[uid].finish_reason == "error":
                request.emit(InputError(generator.responses[uid].error))
                self._finish(running, uid)

    def _hand_out(self, generator, running: dict, uid: int, token, text: str, finish: str | None) -> None:
        import mlx.core as mx

        from ..generate import GenerationResponse

        request = running[uid][0]
        r = generator.responses[uid]
        if finish == "error":
            request.emit(InputError(r.error))
        else:
            request.emit(GenerationResponse(
                text=text, token=token, logprobs=generator.logprobs.get(uid), prompt_tokens=r.prompt_tokens,
                prefilled_tokens=r.prefilled_tokens, prompt_tps=r.prompt_tps, generation_tokens=r.generation_tokens,
                generation_tps=r.generation_tps, peak_memory=mx.get_peak_memory() / 1e9,
                finish_reason=finish))
        if finish:
            self._finish(running, uid)

    def _finish(self, running: dict, uid: int) -> None:
        request, cache, prompt = running.pop(uid)
        self._keep(cache, prompt)
        self._close(request)

    @staticmethod
    def _close(request: Request) -> None:
        if request.media is not None:
            request.media.close()
        request.emit(DONE)

    def _render(self, request: Request) -> tuple[str, dict]:
        """The prompt text (chat messages through the template, with the request's tools) and the
        media its placeholders stand for, in order: what apply_chat_template(tokenize=True) does."""
        if isinstance(request.prompt, str):
            return request.prompt, {}
        from ..processing.processor import media_items

        text = self.processor.apply_chat_template(request.prompt, add_generation_prompt=True,
                                                  enable_thinking=request.enable_thinking, tools=request.tools)
        media = {key: media_items(request.prompt, kind) or None
                 for key, kind in (("images", "image"), ("videos", "video"), ("audio", "audio"))}
        return text, media

    def _cache_for(self, prompt: str, kv_bits: int | None):
        """The cached conversation whose prompt shares the longest prefix with this one (the prompt
        cache then reuses exactly the tokens they share), else a new cache."""
        from ..generate import PromptCache

        shared = [(len(os.path.commonprefix([prompt, text])), i) for i, (_, text) in enumerate(self._caches)]
        best = max(shared, default=(0, None))
        if best[0] == 0 or self._caches[best[1]][0].kv_bits != kv_bits:
            return PromptCache(self.model, kv_bits)
        return self._caches.pop(best[1])[0]

    def _keep(self, cache, prompt: str) -> None:
        self._caches.append((cache, prompt))
        while len(self._caches) > 1 and sum(_nbytes(c) for c, _ in self._caches) > self.cache_bytes:
            self._caches.pop(0)


def _nbytes(cache) -> int:
    return sum(getattr(c, "nbytes", 0) for c in cache.caches)
