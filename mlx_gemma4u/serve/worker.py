"""The engine's thread: prepared requests queue up (a bounded queue: 429 when full) and decode
together through the engine (generation.engine.BatchGenerator: up to --max-concurrency sequences at
once, each with its own sampler, stop strings and limits, each getting exactly the tokens it gets
alone); their tokens go back to each request's event loop as they come.

Requests arrive here already prepared (pool.py: media fetched and decoded, prompt tokenized), so
this thread does nothing but step the batch. Whatever goes wrong in one request ends that request
alone. Log-probabilities are read here too: MLX arrays are evaluated on the thread that made them.

A prompt-prefix cache across requests (least recently used, bounded in bytes): a request starts
from the cached conversation that shares the longest prefix with its prompt, so a conversation's
next turn prefills only its new tokens. A request whose client went away, or whose time ran out,
leaves the batch at once.

With a model split across processes (`group`: mx.distributed, this process rank 0), the other
processes follow this engine: before each step they are sent what joins and leaves the batch
(generation/lockstep.py). If a step fails there, the group is broken: every request ends with an
error and the server stops.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import queue
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_gemma4u.errors import Gemma4UError, InputError
from mlx_gemma4u.generation.engine import BatchGenerator
from mlx_gemma4u.generation.lockstep import Add, Plan, share
from mlx_gemma4u.generation.params import SamplingParams
from mlx_gemma4u.generation.prompt_cache import PromptCache
from mlx_gemma4u.serve.errors import STOPPING, Busy, Fault, ShuttingDown
from mlx_gemma4u.serve.metrics import Metrics

DONE = object()  # the event that ends a request's stream
log = logging.getLogger(__name__)


@dataclass
class Job:
    """One generation: its prepared inputs (prepare_arrays' numpy arrays), its SamplingParams and
    how many top log-probabilities to report with each token (None: no log-probabilities)."""

    inputs: dict[str, np.ndarray]
    params: SamplingParams
    deadline: float
    top_logprobs: int | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.monotonic)
    first_at: float | None = None  # when its first token was handed out

    def __post_init__(self) -> None:
        self.loop = asyncio.get_running_loop()

    def emit(self, event: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


@dataclass
class Token:
    """One token handed to a request, with its reply's counts so far. finish_reason: "stop",
    "length", "timeout" (its time ran out; token None) or None."""

    text: str
    token: int | None
    finish_reason: str | None
    prompt_tokens: int
    prefilled_tokens: int
    generation_tokens: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)  # best first


class Worker:
    """Loads the model in its own thread (MLX arrays belong to the thread that made them, so the
    model is built where it runs) and serves the queue from there."""

    def __init__(
        self,
        load: Callable[[], tuple],
        max_queue: int = 16,
        max_concurrency: int = 8,
        cache_bytes: int = 2 << 30,
        load_drafter: Callable | None = None,  # the loaded model -> its drafter
        idle_unload: float | None = None,
        group=None,
    ):
        self.cache_bytes, self.max_concurrency, self.idle_unload = cache_bytes, max_concurrency, idle_unload
        self._load, self._load_drafter = load, load_drafter
        self.loaded = False
        self._pending: list = []  # a request taken from the queue while idle, for _admit to take first
        self._queue: queue.Queue = queue.Queue(max_queue)
        self._caches: dict = {}  # the PromptCaches of finished requests by their uids, most recently used last
        self.group, self._plan = group, Plan()
        self.broken = False  # a step of a split model failed: the server stops
        self._stopping = False
        self.metrics = Metrics()
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mlx-gemma4u-worker", daemon=True)
        self._thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error

    def submit(self, job: Job) -> None:
        if self._stopping:
            raise ShuttingDown(STOPPING)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Busy("The server is busy: too many requests are waiting; retry shortly.") from None

    def stop(self) -> None:
        """End every queued and running request with an error and let the thread finish."""
        self._stopping = True
        try:
            self._queue.put_nowait(None)  # wakes the thread if it waits for work
        except queue.Full:
            pass

    def join(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the thread to finish (after `stop`)."""
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            generator = self._load_weights()
        except BaseException as e:  # handed to the constructor, which raises it
            self._load_error = e
            return
        finally:
            self._loaded.set()
        running: dict[int, tuple[Job, Any]] = {}  # uid -> (job, its PromptCache)
        while not self._stopping:
            try:
                if generator is not None and generator.done and self.idle_unload and not self._take(self.idle_unload):
                    generator = None  # nothing came for idle_unload seconds: free the weights
                    self._unload()
                if generator is None:
                    generator = self._reload()
                    if generator is None:
                        continue
                self._admit(generator, running, wait=generator.done)
                if self._stopping:
                    break
                if self.group is not None:
                    share(self._plan, self.group)
                self._plan = Plan()  # what the other processes hear before the next step
                for event in generator.step():
                    self._hand_out(generator, running, event)
                self._expire(generator, running)
                self._measure(running)
            except Exception as e:  # a fault of the engine itself, in no one sequence: it starts over
                if self.group is not None:
                    self._break(running, e)
                    break
                log.exception("the batch failed")
                self._end_all(running, Fault("Internal error: the batch failed; retry the request."))
                self._caches.clear()  # the new engine numbers its requests from 0 again
                generator = self._generator()
        self._end_all(running, ShuttingDown(STOPPING))
        if self.group is not None and not self.broken:
            try:
                share(Plan(stop=True), self.group)
            except RuntimeError:  # another process is gone already
                log.warning("a process of the model had stopped before the server did")
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if job is not None:
                job.emit(ShuttingDown(STOPPING))
                job.emit(DONE)

    def _load_weights(self) -> BatchGenerator:
        self.model, self.processor = self._load()
        self.drafter = self._load_drafter(self.model) if self._load_drafter else None
        self.loaded = True
        return self._generator()

    def _break(self, running: dict, error: Exception) -> None:
        """A step of a split model failed: the processes are out of step (or one is gone), so every
        request ends and the server stops, saying why in one line."""
        log.error("error: the server stops: a step of the model split across processes failed (%s).", error)
        log.debug("the failed step", exc_info=error)
        self.broken = self._stopping = True
        self._end_all(running, Fault("The server's model processes stopped; see its log."))
        os.kill(os.getpid(), signal.SIGTERM)

    def _generator(self) -> BatchGenerator:
        return BatchGenerator(self.model, self.processor, max_batch=self.max_concurrency, draft_model=self.drafter)

    def _take(self, timeout: float | None) -> bool:
        """Wait up to `timeout` seconds (None: for ever) for a request, kept for _admit -> whether one came."""
        try:
            self._pending.append(self._queue.get(timeout=timeout))
            return True
        except queue.Empty:
            return False

    def _unload(self) -> None:
        """Free the weights, the drafter's and the cached prompts (the processor stays)."""
        self.model = self.drafter = None
        self._caches.clear()
        self.loaded = False
        gc.collect()
        mx.clear_cache()
        log.info("unloaded the weights after %g s without a request", self.idle_unload)

    def _reload(self) -> BatchGenerator | None:
        """The weights are out: wait for a request and load them again for it -> the engine (None:
        the server is stopping, or the load failed and the waiting requests were told so)."""
        if not self._pending:
            self._take(None)
        if self._stopping:
            return None
        log.info("loading the weights again for a request; it waits until they are in")
        try:
            return self._load_weights()
        except Exception:
            log.exception("loading the weights again failed")
            while self._pending:
                job = self._pending.pop()
                if job is not None:
                    job.emit(Fault("The server could not load the model's weights again; see its log."))
                    job.emit(DONE)
            return None

    def _admit(self, generator, running: dict, wait: bool) -> None:
        """Hand the engine waiting requests while it has room (blocking for one when nothing runs);
        the rest stay in the bounded queue."""
        while len(running) < self.max_concurrency:
            try:
                job = self._pending.pop() if self._pending else self._queue.get(block=wait)
            except queue.Empty:
                return
            wait = False
            if job is None or job.cancelled.is_set():
                if job is not None:
                    job.emit(DONE)
                continue
            continues = None
            try:
                continues, cache = self._cache_for(job.inputs["input_ids"][0].tolist(), job.params.kv_bits)
                arrays = {k: mx.array(v) for k, v in job.inputs.items()}
                if self.group is not None:
                    self._split_ready(job, arrays, cache)
                uid = generator.add(arrays, job.params, cache)
                self._plan.add.append(Add(job.inputs, job.params, continues))
            except Exception as e:  # this request's fault alone (a prompt past the context, say)
                if not isinstance(e, InputError):
                    log.exception("admitting a request failed")
                    e = Fault(f"Internal error ({type(e).__name__}).")
                self._forget(continues)
                job.emit(e)
                job.emit(DONE)
                continue
            running[uid] = (job, cache)

    def _split_ready(self, job: Job, arrays: dict, cache: PromptCache) -> None:
        """Before the other processes of a split model hear of `job`: its seed set (so that every
        process draws the same tokens) and its media embedded (so that a failure there is its own)."""
        if job.params.seed is None:
            job.params = job.params.replace(seed=random.getrandbits(63))
        if self.model.embeds_inputs:
            cache.media.embed(self.model, arrays)

    def _hand_out(self, generator, running: dict, event) -> None:
        if event.uid not in running:  # its request ended at an earlier event of this step
            return
        job = running[event.uid][0]
        r = generator.responses[event.uid]
        if event.finish_reason == "error":
            self._fail(running, event.uid, r)
            return
        try:
            token = Token(
                event.text, event.token, event.finish_reason, r.prompt_tokens, r.prefilled_tokens, r.generation_tokens
            )
            if job.top_logprobs is not None:
                token.logprob, token.top_logprobs = _logprobs(event.logprobs, event.token, job.top_logprobs)
        except Exception as e:  # this request's fault alone
            log.exception("handing out a token failed")
            self._cancel(generator, event.uid)
            running[event.uid][0].emit(Fault(f"Internal error ({type(e).__name__})."))
            self._finish(running, event.uid)
            return
        job.emit(token)
        now = time.monotonic()
        job.first_at = job.first_at or now
        if event.finish_reason:
            self.metrics.reply(r, job.first_at - job.queued_at, now - job.first_at)
            self._finish(running, event.uid)

    def _measure(self, running: dict) -> None:
        """The load gauges, after each step."""
        self.metrics.queued.set(self._queue.qsize())
        self.metrics.running.set(len(running))
        held = [cache for _, cache in running.values()] + list(self._caches.values())
        self.metrics.kv_bytes.set(sum(_nbytes(c) for c in held))

    def _cancel(self, generator, uid: int) -> None:
        generator.cancel(uid)
        self._plan.cancel.append(uid)

    def _expire(self, generator, running: dict) -> None:
        """Requests whose client left or whose time ran out leave the batch (the latter told so)."""
        for uid, (job, _) in list(running.items()):
            timed_out = time.monotonic() > job.deadline
            if job.cancelled.is_set() or timed_out:
                self._cancel(generator, uid)
                if timed_out:
                    r = generator.responses[uid]
                    job.emit(Token("", None, "timeout", r.prompt_tokens, r.prefilled_tokens, r.generation_tokens))
                self._finish(running, uid)

    def _fail(self, running: dict, uid: int, response) -> None:
        """The engine refused or dropped sequence `uid`: its request hears why."""
        running[uid][0].emit((Fault if response.fault else InputError)(response.error))
        self._finish(running, uid)

    def _end_all(self, running: dict, error: Gemma4UError) -> None:
        for uid in list(running):
            running[uid][0].emit(error)
            self._finish(running, uid)

    def _finish(self, running: dict, uid: int) -> None:
        job, cache = running.pop(uid)
        self._caches[uid] = cache
        while len(self._caches) > 1 and sum(_nbytes(c) for c in self._caches.values()) > self.cache_bytes:
            self._forget(next(iter(self._caches)))
        job.emit(DONE)

    def _cache_for(self, ids: list[int], kv_bits: int | None) -> tuple[int | None, PromptCache]:
        """The cached conversation that shares the longest prefix with this prompt (the prompt
        cache then reuses exactly the tokens they share), else a new cache -> (the uid of the
        request that filled it, or None; the cache)."""
        shared = [(len(os.path.commonprefix([ids, cache.tokens])), uid) for uid, cache in self._caches.items()]
        best, uid = max(shared, default=(0, None))
        if best == 0 or self._caches[uid].kv_bits != kv_bits:
            return None, PromptCache(self.model, kv_bits)
        self.metrics.prefix_hits.inc()
        return uid, self._caches.pop(uid)

    def _forget(self, uid: int | None) -> None:
        """Let the cache of finished request `uid` go (the other processes too)."""
        if uid is not None:
            self._caches.pop(uid, None)
            self._plan.forget.append(uid)


def _logprobs(logprobs, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The token's log-probability and the k most likely (id, log-probability), best first."""
    top = []
    if k:
        ids = mx.argpartition(-logprobs, k - 1)[:k]
        top = sorted(zip(ids.tolist(), logprobs[ids].tolist()), key=lambda pair: -pair[1])
    return logprobs[token].item(), top


def _nbytes(cache) -> int:
    total = 0
    for c in cache.caches:
        try:
            total += c.nbytes
        except (AttributeError, NotImplementedError):  # a cache type that does not say
            pass
    return total
