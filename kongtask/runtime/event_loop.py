"""One asyncio event loop on a daemon thread of its own.

A Runner whose task map holds ``async def`` handlers runs their coroutines
here: any thread submits a coroutine and gets a ``concurrent.futures.Future``
back (cancelling it cancels the coroutine). Stopping cancels whatever still
runs, lets it unwind, then closes the loop and joins the thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["LoopThread"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: How long starting the loop thread may take before it counts as failed.
_START_TIMEOUT_S = 10.0


class LoopThread:
    """An event loop running on its own thread until :meth:`stop`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop (only after :meth:`start`)."""
        assert self._loop is not None, "LoopThread.start() runs first"
        return self._loop

    @property
    def thread(self) -> threading.Thread | None:
        """The loop's thread, once started."""
        return self._thread

    def start(self) -> None:
        """Start the thread and return once its loop runs."""
        loop = self._loop = asyncio.new_event_loop()
        thread = self._thread = threading.Thread(
            target=self._serve, args=(loop,), name=self.name, daemon=True
        )
        thread.start()
        if not self._ready.wait(_START_TIMEOUT_S):
            raise RuntimeError(f"the event loop thread {self.name} did not start")

    def _serve(self, loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(self._ready.set)
        try:
            loop.run_forever()
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        """Run ``coro`` on the loop; callable from any thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, timeout_s: float) -> None:
        """Cancel every task still on the loop, let them unwind, stop and join (bounded)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        try:
            done = asyncio.run_coroutine_threadsafe(_cancel_all(), loop)
            done.result(timeout_s)
        except (concurrent.futures.TimeoutError, RuntimeError) as exc:
            logger.warning("Event loop %s: tasks did not unwind in time: %r", self.name, exc)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        if thread.is_alive():
            logger.warning("Event loop %s did not stop within %.1f s", self.name, timeout_s)


async def _cancel_all() -> None:
    """Cancel every task on this loop but the caller and wait until they end."""
    me = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not me]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
