"""The threads that prepare requests: fetching and decoding media, rendering the chat template,
tokenizing. That work is untrusted and slow, so it runs here, never in the event loop (which must
keep streaming) nor in the engine's thread (which must keep stepping the batch).

A bounded backlog (more waiting requests get 429) and daemon threads: a fetch that hangs cannot
hold the process at shutdown, and `stop` ends every waiting request with an error.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any

from mlx_gemma4u.serve.errors import STOPPING, Busy, ShuttingDown


class PreparePool:
    def __init__(self, threads: int, backlog: int):
        self._jobs: queue.Queue = queue.Queue(backlog)
        self._waiting: set[asyncio.Future] = set()
        self._stopped = False
        for n in range(threads):
            threading.Thread(target=self._serve, name=f"mlx-gemma4u-prepare-{n}", daemon=True).start()

    async def run(self, work: Callable[[], Any]) -> Any:
        """work() on a pool thread -> its result (or its exception, raised here)."""
        if self._stopped:
            raise ShuttingDown(STOPPING)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        try:
            self._jobs.put_nowait((work, future, loop))
        except queue.Full:
            raise Busy("The server is busy: too many requests are waiting; retry shortly.") from None
        self._waiting.add(future)
        try:
            return await future
        finally:
            self._waiting.discard(future)

    def stop(self) -> None:
        """End every waiting and running request with ShuttingDown (call from the event loop)."""
        self._stopped = True
        for future in list(self._waiting):
            if not future.done():
                future.set_exception(ShuttingDown(STOPPING))

    def _serve(self) -> None:
        while True:
            work, future, loop = self._jobs.get()
            if future.done():  # its client left, or the server is stopping
                continue
            try:
                result, error = work(), None
            except BaseException as e:  # handed to the request that asked, whatever it is
                result, error = None, e
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:  # the event loop is closed: the server has stopped
                return


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
