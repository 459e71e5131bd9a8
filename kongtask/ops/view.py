"""What operations read of a Runner: a small typed view, so ops never reach inside it.

:class:`kongtask.Runner` satisfies :class:`RunnerView`; the health probes and
the metrics are written against this protocol alone.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from kongtask.settings import WorkerSettings

if TYPE_CHECKING:
    from kongtask.runner import RunnerLoad

__all__ = ["RunnerView"]


class RunnerView(Protocol):
    """The read-only face of a Runner that ``/healthz``, ``/readyz`` and ``/metrics`` use."""

    @property
    def settings(self) -> WorkerSettings:
        """The Runner's validated settings."""
        ...

    @property
    def running(self) -> bool:
        """True between a successful start and the end of the shutdown."""
        ...

    @property
    def pool_id(self) -> str | None:
        """The pool id, once started."""
        ...

    @property
    def listening(self) -> bool | None:
        """Whether LISTEN is connected; None when the Runner does not listen."""
        ...

    def probe(self, timeout_s: float = 0.5) -> dict[str, dict[str, Any]]:
        """Every part's answer within ``timeout_s`` (see ``Runner.probe``)."""
        ...

    def load(self) -> RunnerLoad | None:
        """The executors' and local queue's load now."""
        ...

    def cron_lag_s(self) -> float | None:
        """How far cron is behind, or None without cron."""
        ...

    def now(self) -> datetime:
        """The time by the Runner's clock."""
        ...

    def connection(self, timeout_s: float = 5.0) -> AbstractContextManager[Any]:
        """A connection from the Runner's pool."""
        ...
