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
from kongtask.runtime.actor import Actor, ErrorPolicy
from kongtask.runtime.message import Fieldless

__all__ = [
    "CrontabLoader",
    "GetItems",
    "LoaderMessage",
    "Reload",
    "SetCodeItems",
    "SetStoredItems",
    "merge",
]

logger = logging.getLogger("kongtask.cron")


class Reload(Fieldless):
    """Re-read the crontab (answers False, the schedule unchanged, if it cannot be loaded)."""

    __slots__ = ()


class GetItems(Fieldless):
    """Answer the live items, as a list."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class SetCodeItems:
    """Replace the programmatic items (``Scheduler.reload_cron_items(items)``)."""

    items: tuple[ParsedCronItem, ...]


@dataclass(frozen=True, slots=True)
class SetStoredItems:
    """The database's stored items as last read (only changes are applied)."""

    items: tuple[ParsedCronItem, ...]


LoaderMessage = Reload | GetItems | SetCodeItems | SetStoredItems


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


class CrontabLoader(Actor):
    """Owns the crontab source, the three item lists and the merged live set."""

    # A change that fails keeps the previous schedule (see recover).
    error_policy = ErrorPolicy.RECOVER

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

    def handle(self, message: LoaderMessage) -> Any:
        match message:
            case Reload():
                return self._reload()
            case GetItems():
                return list(self._live)
            case SetCodeItems(items):
                return self._apply(code=list(items), description="cron items")
            case SetStoredItems(items):
                if list(items) == self._stored:
                    return True
                return self._apply(stored=list(items), description="stored cron items")
        return None

    def recover(self, message: Any, error: Exception) -> bool:
        # Never let a reload kill the actor: nothing changed, the old schedule runs on.
        logger.exception("Cron items could not be changed; keeping the previous schedule")
        self._emit(events.cron_reload_failed, error=error, source="cron items")
        return False

    def _reload(self) -> bool:
        if self._source is None:
            return True  # only programmatic and stored items: nothing to re-read
        description = self._source.description
        try:
            items, blank = self._source.load_noting_blank()
            if not items and self._crontab and blank:
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
