"""The cron actors of one Scheduler: the Matcher, the CrontabLoader and the CronWriter.

``CronService`` starts the three actors with items already parsed (so a bad
file fails the start with its line number before anything connects), passes
reloads and item changes to the loader, and stops exactly those actors again.
:class:`kongtask.Scheduler` owns it; a Runner's cron part is a Scheduler.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import pykka

from kongtask.cron.service.loader import (
    CrontabLoader,
    GetItems,
    Reload,
    SetCodeItems,
    SetStoredItems,
    merge,
)
from kongtask.cron.service.matcher_actor import CronMatcher, CronProgress
from kongtask.cron.service.writer import ConnectionFactory, CronWriter
from kongtask.cron.source import CrontabSource
from kongtask.cron.types import ParsedCronItem
from kongtask.db.statements import Queries
from kongtask.protocols import Clock

__all__ = ["CronService"]

logger = logging.getLogger("kongtask.cron")


class CronService:
    """Starts, reloads and stops the cron actors; holds no scheduling logic itself."""

    def __init__(
        self,
        *,
        source: CrontabSource | None,
        clock: Clock,
        connect: ConnectionFactory,
        queries: Queries,
        emit: Callable[..., None],
        code_items: Sequence[ParsedCronItem] = (),
        backfill_on_start: bool = True,
        node: str = "",
        overdue_tolerance_s: float = 0.0,
    ) -> None:
        self._overdue_tolerance_s = overdue_tolerance_s
        self._source = source
        self._clock = clock
        self._connect = connect
        self._queries = queries
        self._emit = emit
        self._code_items = tuple(code_items)
        self._backfill_on_start = backfill_on_start
        self._node = node
        self._actors: dict[str, pykka.ActorRef[Any]] = {}
        self._loader: pykka.ActorRef[Any] | None = None
        #: The matcher's live minute, for :meth:`kongtask.Scheduler.lag_s`.
        self.progress = CronProgress()

    def start(
        self,
        items: list[ParsedCronItem] | None = None,
        *,
        stored: Sequence[ParsedCronItem] = (),
    ) -> None:
        """Start the actors with the crontab's ``items`` (parsed from the source if not
        given; raises ``CrontabError``), the code items and the ``stored`` items."""
        if items is None:
            items = self._source.load() if self._source is not None else []
        live, _ = merge(items, self._code_items, stored)
        description = self._source.description if self._source is not None else "code"
        logger.info(
            "Cron: %d item(s) from %s, %d from code", len(items), description, len(self._code_items)
        )
        writer = CronWriter.start(self._connect, self._queries, self._node)
        self._actors["cron:writer"] = writer
        matcher = CronMatcher.start(
            items=live,
            clock=self._clock,
            writer=writer,
            emit=self._emit,
            backfill_on_start=self._backfill_on_start,
            overdue_tolerance_s=self._overdue_tolerance_s,
            progress=self.progress,
        )
        self._actors["cron:matcher"] = matcher
        self._loader = CrontabLoader.start(
            source=self._source,
            crontab_items=items,
            code_items=self._code_items,
            stored_items=stored,
            matcher=matcher,
            emit=self._emit,
        )
        self._actors["cron:loader"] = self._loader

    def _ask(self, message: Any, timeout_s: float | None, default: Any) -> Any:
        loader = self._loader
        if loader is None:
            return default
        try:
            return loader.ask(message, timeout=timeout_s)
        except (pykka.ActorDeadError, pykka.Timeout):
            return default

    def reload(self, timeout_s: float | None = 30.0) -> bool:
        """Re-read the crontab; ``False`` (and the old schedule kept) if it fails to load."""
        return bool(self._ask(Reload(), timeout_s, False))

    def set_code_items(self, items: Sequence[ParsedCronItem], timeout_s: float = 30.0) -> bool:
        """Replace the programmatic items; ``False`` (nothing changed) on a clash."""
        return bool(self._ask(SetCodeItems(tuple(items)), timeout_s, False))

    def set_stored_items(self, items: Sequence[ParsedCronItem], timeout_s: float = 30.0) -> bool:
        """Apply the database's stored items as just read (a no-op if unchanged)."""
        return bool(self._ask(SetStoredItems(tuple(items)), timeout_s, False))

    def items(self, timeout_s: float = 30.0) -> list[ParsedCronItem]:
        """The live items."""
        return list(self._ask(GetItems(), timeout_s, []))

    def request_reload(self) -> None:
        """Ask for a reload without waiting (safe from a signal-handling thread)."""
        loader = self._loader
        if loader is not None:
            try:
                loader.tell(Reload())
            except pykka.ActorDeadError:
                pass

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the loader, then the matcher, then the writer (newest first)."""
        actors, self._actors, self._loader = list(self._actors.values()), {}, None
        for actor in reversed(actors):
            try:
                actor.stop(timeout=timeout_s)
            except (pykka.ActorDeadError, pykka.Timeout):
                logger.warning("A cron actor did not stop in time: %r", actor)

    @property
    def alive(self) -> bool:
        """True while every cron actor is running."""
        return bool(self._actors) and all(actor.is_alive() for actor in self._actors.values())

    def parts(self) -> dict[str, pykka.ActorRef[Any]]:
        """The cron actors by name (``cron:writer``, ``cron:matcher``, ``cron:loader``),
        for the liveness probe to ask; empty when stopped."""
        return dict(self._actors)
