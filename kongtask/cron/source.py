"""Where a Runner's crontab comes from: text, a file, or items built in code."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kongtask.errors import ConfigurationError, CrontabError

from .parser import parse_crontab
from .types import ParsedCronItem

__all__ = ["CrontabSource"]


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
            identifiers = [item.identifier for item in items]
            duplicates = sorted({i for i in identifiers if identifiers.count(i) > 1})
            if duplicates:
                raise ConfigurationError(
                    "cron_items has duplicate identifiers: "
                    + ", ".join(repr(i) for i in duplicates),
                    name="cron_items",
                )
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
        if self.items is not None:
            return list(self.items)
        if self.file is not None:
            try:
                text = self.file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise CrontabError(f"Failed to read crontab file '{self.file}': {exc}") from exc
            try:
                return parse_crontab(text)
            except CrontabError as exc:
                raise CrontabError(
                    f"{self.file}: {exc}", line=exc.line, column=exc.column, source=str(self.file)
                ) from exc
        return parse_crontab(self.text or "")
