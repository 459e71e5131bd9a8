"""The cron scheduler of one Runner: the Matcher, the CrontabLoader and the CronWriter.

``CronService`` parses the crontab before anything starts (so a bad file
fails the Runner's start with its line number), starts the three actors, and
stops exactly those actors again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pykka

from kongtask.cron.source import CrontabSource
from kongtask.cron.types import ParsedCronItem
from kongtask.protocols import Clock
from kongtask.sql import Queries

from .cron_matcher import CronMatcher
from .cron_writer import ConnectionFactory, CronWriter
from .crontab_loader import RELOAD, CrontabLoader

__all__ = ["CronService"]

logger = logging.getLogger("kongtask.cron")


class CronService:
    """Starts, reloads and stops the cron actors; holds no scheduling logic itself."""

    def __init__(
        self,
        *,
        source: CrontabSource,
        clock: Clock,
        connect: ConnectionFactory,
        queries: Queries,
        emit: Callable[..., None],
    ) -> None:
        self._source = source
        self._clock = clock
        self._connect = connect
        self._queries = queries
        self._emit = emit
        self._actors: list[pykka.ActorRef[Any]] = []
        self._loader: pykka.ActorRef[Any] | None = None

    def start(self, items: list[ParsedCronItem] | None = None) -> None:
        """Start the actors with ``items`` (parsed from the source if not given;
        raises ``CrontabError``)."""
        if items is None:
            items = self._source.load()
        logger.info("Cron: %d item(s) from %s", len(items), self._source.description)
        writer = CronWriter.start(self._connect, self._queries)
        self._actors.append(writer)
        matcher = CronMatcher.start(items=items, clock=self._clock, writer=writer, emit=self._emit)
        self._actors.append(matcher)
        self._loader = CrontabLoader.start(
            source=self._source, items=items, matcher=matcher, emit=self._emit
        )
        self._actors.append(self._loader)

    def reload(self, timeout_s: float | None = 30.0) -> bool:
        """Re-read the crontab; ``False`` (and the old schedule kept) if it fails to load."""
        loader = self._loader
        if loader is None:
            return False
        try:
            return bool(loader.ask(RELOAD, timeout=timeout_s))
        except (pykka.ActorDeadError, pykka.Timeout):
            return False

    def request_reload(self) -> None:
        """Ask for a reload without waiting (safe from a signal-handling thread)."""
        loader = self._loader
        if loader is not None:
            try:
                loader.tell(RELOAD)
            except pykka.ActorDeadError:
                pass

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the loader, then the matcher, then the writer (newest first)."""
        actors, self._actors, self._loader = self._actors, [], None
        for actor in reversed(actors):
            try:
                actor.stop(timeout=timeout_s)
            except (pykka.ActorDeadError, pykka.Timeout):
                logger.warning("A cron actor did not stop in time: %r", actor)

    @property
    def alive(self) -> bool:
        """True while every cron actor is running."""
        return bool(self._actors) and all(actor.is_alive() for actor in self._actors)
