"""The interfaces kongtask's moving parts agree on, as ``Protocol`` classes.

They are structural: anything with the right methods fits, so a test can pass
a :class:`kongtask.testing.ManualClock` where the worker expects a clock, and a
task handler is any callable taking ``(payload, helpers)``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import asyncio

    from psycopg_pool import AsyncConnectionPool, ConnectionPool

    from kongtask.db.statements import Queries
    from kongtask.helpers import Helpers

__all__ = ["AsyncHelpersContext", "Clock", "HelpersContext", "TaskHandler", "TimerHandle"]


@runtime_checkable
class TimerHandle(Protocol):
    """A scheduled callback that can still be called off."""

    def cancel(self) -> None:
        """Stop the callback from running if it has not run yet (idempotent)."""


@runtime_checkable
class Clock(Protocol):
    """The worker's only source of time and timers.

    Only time-dependent housekeeping goes through it (the poll fallback, the
    stale-lock sweep, the local-queue TTL), so tests can drive that logic
    without sleeping. Callbacks run on a clock-owned thread and must be quick:
    they only send a message.
    """

    def now(self) -> datetime:
        """The current time, timezone-aware (UTC)."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards (for durations)."""

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> TimerHandle:
        """Run ``callback`` once, ``delay_s`` seconds from now."""


class TaskHandler(Protocol):
    """A task: called with the job's payload and its helpers.

    Returning normally means success and raising means failure. For a batch
    job (a list payload), returning a list of the same length whose items are
    exceptions or results fails only the items that are exceptions.
    """

    def __call__(self, payload: Any, helpers: Helpers, /) -> Any: ...


class HelpersContext(Protocol):
    """What a job's :class:`~kongtask.helpers.Helpers` needs from the pool running it.

    The worker's internal context satisfies it; so can a test's stand-in,
    which keeps the public ``Helpers`` independent of the actors package.
    """

    @property
    def pool(self) -> ConnectionPool[Any]:
        """The pool the handler's own queries and follow-up jobs use."""

    @property
    def queries(self) -> Queries:
        """The statements, composed for the worker's schema."""

    @property
    def queue_names(self) -> dict[int, str]:
        """Named queues by id, filled as they are first asked for."""


class AsyncHelpersContext(Protocol):
    """What :class:`~kongtask.helpers.AsyncHelpers` needs besides :class:`HelpersContext`:
    the event loop async handlers run on and an async pool opened on first use."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the handler runs on."""

    async def async_pool(self) -> AsyncConnectionPool[Any]:
        """The async pool for the handler's own queries and follow-up jobs."""
