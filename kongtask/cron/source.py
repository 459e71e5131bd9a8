"""Where a Runner's crontab comes from: text, a file, or items built in code.

Editors and ``cp`` rewrite a file in place (truncate, then write), so a reload can
catch it empty or half written. A file is therefore read until two reads a moment
apart agree, and :attr:`CrontabSource.last_was_empty` tells the loader that what it
read had no content at all (not even a comment), which it treats as "mid-rewrite"
rather than "remove every item" while a schedule is live.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kongtask.cron.parser import parse_crontab
from kongtask.cron.types import ParsedCronItem
from kongtask.errors import ConfigurationError, CrontabError

__all__ = ["CrontabSource", "check_unique_identifiers", "read_stable"]

# A file is re-read after this pause until two reads agree (at most _STABLE_TRIES times).
_STABLE_PAUSE_S = 0.05
_STABLE_TRIES = 40


def read_stable(path: Path) -> str:
    """Read ``path`` until two reads ``_STABLE_PAUSE_S`` apart give the same text.

    An empty read is retried like a changing one, so a file caught between truncate
    and write is read again once the writer is done (up to about two seconds).
    """
    pause = threading.Event()
    text = path.read_text(encoding="utf-8")
    for _ in range(_STABLE_TRIES):
        pause.wait(_STABLE_PAUSE_S)
        again = path.read_text(encoding="utf-8")
        if again == text and text.strip():
            return text
        text = again
    return text


def check_unique_identifiers(items: Sequence[ParsedCronItem]) -> None:
    """Raise ``ConfigurationError`` (``name="cron_items"``) if two items share an identifier."""
    identifiers = [item.identifier for item in items]
    duplicates = sorted({i for i in identifiers if identifiers.count(i) > 1})
    if duplicates:
        raise ConfigurationError(
            "cron_items has duplicate identifiers: " + ", ".join(repr(i) for i in duplicates),
            name="cron_items",
        )


@dataclass(frozen=True, slots=True)
class CrontabSource:
    """One of ``text``, ``file`` or ``items``; :meth:`load` parses it (again).

    Only a file can change between loads, which is what a reload picks up.
    """

    text: str | None = None
    file: Path | None = None
    items: tuple[ParsedCronItem, ...] | None = None

    @classmethod
    def of(
        cls,
        *,
        crontab: str | None = None,
        crontab_file: str | Path | None = None,
        cron_items: Sequence[ParsedCronItem] | None = None,
    ) -> CrontabSource | None:
        """Validate the Runner's three crontab arguments; ``None`` when cron is off."""
        given = [
            name
            for name, value in (
                ("crontab", crontab),
                ("crontab_file", crontab_file),
                ("cron_items", cron_items),
            )
            if value is not None
        ]
        if len(given) > 1:
            raise ConfigurationError(
                "give at most one of crontab, crontab_file and cron_items "
                f"(got {', '.join(given)})",
                name=given[1],
            )
        if crontab is not None:
            if not isinstance(crontab, str):
                raise ConfigurationError("crontab must be a string", name="crontab", value=crontab)
            return cls(text=crontab)
        if crontab_file is not None:
            if not isinstance(crontab_file, str | Path):
                raise ConfigurationError(
                    "crontab_file must be a path", name="crontab_file", value=crontab_file
                )
            return cls(file=Path(crontab_file))
        if cron_items is not None:
            items = tuple(cron_items)
            for index, item in enumerate(items):
                if not isinstance(item, ParsedCronItem):
                    raise ConfigurationError(
                        f"cron_items[{index}] is not a ParsedCronItem; build items with "
                        "kongtask.parse_cron_items() or kongtask.parse_crontab()",
                        name="cron_items",
                        value=item,
                    )
            check_unique_identifiers(items)
            return cls(items=items)
        return None

    @property
    def description(self) -> str:
        """Where the items come from, for log lines."""
        if self.file is not None:
            return f"crontab file '{self.file}'"
        return "crontab text" if self.text is not None else "cron items"

    def load(self) -> list[ParsedCronItem]:
        """Parse the source now; a file is read afresh. Raises ``CrontabError``."""
        return self.load_noting_blank()[0]

    def load_noting_blank(self) -> tuple[list[ParsedCronItem], bool]:
        """:meth:`load`, and whether the source is a file whose text, in this very read,
        holds nothing at all (not even a comment): what a reload sees in the middle of an
        in-place rewrite. One read gives both, so a writer racing it cannot make them
        disagree (a second read used to find the file full again and let the empty
        first one through)."""
        if self.items is not None:
            return list(self.items), False
        if self.file is not None:
            try:
                text = read_stable(self.file)
            except (OSError, UnicodeDecodeError) as exc:
                raise CrontabError(f"Failed to read crontab file '{self.file}': {exc}") from exc
            try:
                return parse_crontab(text), not text.strip()
            except CrontabError as exc:
                raise CrontabError(
                    f"{self.file}: {exc}", line=exc.line, column=exc.column, source=str(self.file)
                ) from exc
        return parse_crontab(self.text or ""), False
