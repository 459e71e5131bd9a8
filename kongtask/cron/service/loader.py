"""The CrontabLoader: owns the live item set and hands changes to the Matcher.

The live set is the union of three sources: the crontab (text or file), the
programmatic items given in code, and the items stored in the database
(``_kongtask_cron_items``, shared by every kongtask node on the schema). A change
to any of them that fails (an unreadable file, a bad line, an identifier used by
two sources) changes nothing: the previous schedule keeps running, the error is
logged with its line, and ``cron:reloadFailed`` is emitted. A file read empty
while items from it are live is taken for a rewrite in progress and ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pykka

from kongtask import events
from kongtask.cron.service.matcher_actor import SetItems
from kongtask.cron.source import CrontabSource
from kongtask.cron.types import ParsedCronItem
from kongtask.errors import CrontabError

__all__ = ["GET_ITEMS", "RELOAD", "CrontabLoader", "SetCodeItems", "SetStoredItems", "merge"]

logger = logging.getLogger("kongtask.cron")

RELOAD = "reload"
GET_ITEMS = "get_items"


@dataclass(frozen=True, slots=True)
class SetCodeItems:
    """Replace the programmatic items (``Scheduler.reload_cron_items(items)``)."""

    items: tuple[ParsedCronItem, ...]


@dataclass(frozen=True, slots=True)
class SetStoredItems:
    """The database's stored items as last read (only changes are applied)."""

    items: tuple[ParsedCronItem, ...]


def merge(
    crontab: Sequence[ParsedCronItem],
    code: Sequence[ParsedCronItem],
    stored: Sequence[ParsedCronItem],
) -> tuple[list[ParsedCronItem], list[str]]:
    """The live items and the stored identifiers left out because another source has them.

    The crontab and the code items must not share an identifier (a ``CrontabError``);
    a stored item that clashes with either is left out on this node (and reported).
    """
    seen: dict[str, str] = {}
    for origin, items in (("crontab", crontab), ("code", code)):
        for item in items:
            if item.identifier in seen:
                raise CrontabError(
                    f"cron identifier {item.identifier!r} is used by the {seen[item.identifier]}"
                    f" and by the {origin} items; identifiers must be unique"
                )
            seen[item.identifier] = origin
    clashes = [item.identifier for item in stored if item.identifier in seen]
    live = [*crontab, *code, *(item for item in stored if item.identifier not in seen)]
    return live, clashes


class CrontabLoader(pykka.ThreadingActor):
    """Owns the crontab source, the three item lists and the merged live set."""

    use_daemon_thread = True

    def __init__(
        self,
        *,
        source: CrontabSource | None,
        crontab_items: list[ParsedCronItem],
        code_items: Sequence[ParsedCronItem],
        matcher: pykka.ActorRef[Any],
        emit: Callable[..., None],
        stored_items: Sequence[ParsedCronItem] = (),
    ) -> None:
        super().__init__()
        self._source = source
        self._crontab = list(crontab_items)
        self._code = list(code_items)
        self._stored: list[ParsedCronItem] = list(stored_items)
        self._live, _ = merge(self._crontab, self._code, self._stored)
        self._matcher = matcher
        self._emit = emit
        self._reported_clashes: frozenset[str] = frozenset()

    def on_receive(self, message: Any) -> Any:
        try:
            if message == RELOAD:
                return self._reload()
            if message == GET_ITEMS:
                return list(self._live)
            if isinstance(message, SetCodeItems):
                return self._apply(code=list(message.items), description="cron items")
            if isinstance(message, SetStoredItems):
                if list(message.items) == self._stored:
                    return True
                return self._apply(stored=list(message.items), description="stored cron items")
        except Exception as exc:  # never let a reload kill the actor
            logger.exception("Cron items could not be changed; keeping the previous schedule")
            self._emit(events.cron_reload_failed, error=exc, source="cron items")
            return False
        return None

    def _reload(self) -> bool:
        if self._source is None:
            return True  # only programmatic and stored items: nothing to re-read
        description = self._source.description
        try:
            items = self._source.load()
            if not items and self._crontab and self._source.is_empty_file():
                raise CrontabError(
                    f"{description} is empty (an editor or cp may be rewriting it); keeping"
                    f" the {len(self._crontab)} live item(s) from it. To remove every item,"
                    " leave a comment line in the file."
                )
        except CrontabError as exc:
            logger.error("Crontab reload failed; keeping the previous schedule: %s", exc)
            self._emit(events.cron_reload_failed, error=exc, source=description)
            return False
        return self._apply(crontab=items, description=description)

    def _apply(
        self,
        *,
        description: str,
        crontab: list[ParsedCronItem] | None = None,
        code: list[ParsedCronItem] | None = None,
        stored: list[ParsedCronItem] | None = None,
    ) -> bool:
        new_crontab = self._crontab if crontab is None else crontab
        new_code = self._code if code is None else code
        new_stored = self._stored if stored is None else stored
        try:
            live, clashes = merge(new_crontab, new_code, new_stored)
        except CrontabError as exc:
            logger.error("Cron items not changed: %s", exc)
            self._emit(events.cron_reload_failed, error=exc, source=description)
            return False
        if frozenset(clashes) != self._reported_clashes and clashes:
            logger.error(
                "Stored cron item(s) %s clash with this node's own items and are not"
                " scheduled here",
                ", ".join(repr(c) for c in clashes),
            )
        self._reported_clashes = frozenset(clashes)
        old = {item.identifier for item in self._live}
        new = {item.identifier for item in live}
        self._crontab, self._code, self._stored, self._live = (
            new_crontab,
            new_code,
            new_stored,
            live,
        )
        self._matcher.tell(SetItems(tuple(live)))
        logger.info(
            "Crontab reloaded from %s: %d item(s), %d added, %d removed",
            description,
            len(live),
            len(new - old),
            len(old - new),
        )
        self._emit(
            events.cron_reload,
            items=len(live),
            added=sorted(new - old),
            removed=sorted(old - new),
        )
        return True
