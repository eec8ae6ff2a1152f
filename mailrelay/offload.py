"""One long-lived thread for blocking calls that must run one at a time (fsync batches).

``asyncio.to_thread`` goes through ThreadPoolExecutor: a context copy, its work-item
and idle-thread bookkeeping, and two chained futures per call, which showed in py-spy
of a loaded worker. Here a call is one put on a C-implemented queue and one
``call_soon_threadsafe`` back.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class SerialThread:
    def __init__(self, name: str):
        self.name = name
        self._calls: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the thread; calls run in the order they were made."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=self.name,
                                                daemon=True)
                self._thread.start()
        self._calls.put((loop, done, fn, args))
        return await done

    def _serve(self) -> None:
        while True:
            loop, done, fn, args = self._calls.get()
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # handed to the caller, whatever it is
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(_settle, done, result, error)


def _settle(done: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if done.done():  # the caller was cancelled
        return
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(result)
