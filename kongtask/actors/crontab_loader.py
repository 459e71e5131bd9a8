"""The CrontabLoader: re-reads the crontab on request and hands new items to the Matcher.

A reload that fails (unreadable file, a bad line) changes nothing: the
previous schedule keeps running, the error is logged with its line, and
``cron:reloadFailed`` is emitted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pykka

from kongtask import events
from kongtask.cron.source import CrontabSource
from kongtask.cron.types import ParsedCronItem
from kongtask.errors import CrontabError

from .cron_matcher import SetItems

__all__ = ["RELOAD", "CrontabLoader"]

logger = logging.getLogger("kongtask.cron")

RELOAD = "reload"


class CrontabLoader(pykka.ThreadingActor):
    """Owns the crontab source and the item set that was last loaded."""

    use_daemon_thread = True

    def __init__(
        self,
        *,
        source: CrontabSource,
        items: list[ParsedCronItem],
        matcher: pykka.ActorRef[Any],
        emit: Callable[..., None],
    ) -> None:
        super().__init__()
        self._source = source
        self._items = items
        self._matcher = matcher
        self._emit = emit

    def on_receive(self, message: Any) -> Any:
        if message == RELOAD:
            return self._reload()
        return None

    def _reload(self) -> bool:
        try:
            items = self._source.load()
        except CrontabError as exc:
            logger.error("Crontab reload failed; keeping the previous schedule: %s", exc)
            self._emit(events.cron_reload_failed, error=exc, source=self._source.description)
            return False
        except Exception as exc:  # never let a reload kill the actor
            logger.exception("Crontab reload failed; keeping the previous schedule")
            self._emit(events.cron_reload_failed, error=exc, source=self._source.description)
            return False
        old = {item.identifier for item in self._items}
        new = {item.identifier for item in items}
        self._items = items
        self._matcher.tell(SetItems(tuple(items)))
        logger.info(
            "Crontab reloaded from %s: %d item(s), %d added, %d removed",
            self._source.description,
            len(items),
            len(new - old),
            len(old - new),
        )
        self._emit(
            events.cron_reload,
            items=len(items),
            added=sorted(new - old),
            removed=sorted(old - new),
        )
        return True
