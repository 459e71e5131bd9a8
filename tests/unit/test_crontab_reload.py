"""A crontab file reload refuses an empty read even when the file is full again by the time
anyone could look twice (an editor or ``cp`` rewriting it in place)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kongtask.cron import parse_crontab
from kongtask.cron import source as source_module
from kongtask.cron.service.loader import CrontabLoader, GetItems, Reload
from kongtask.cron.source import CrontabSource

CRONTAB = "* * * * * tick\n* * * * * tock\n"


class _Matcher:
    """Stands in for the matcher actor: records the item sets it is told."""

    def __init__(self) -> None:
        self.told: list[Any] = []

    def tell(self, message: Any) -> None:
        self.told.append(message)


def test_the_blank_read_is_the_one_parsed(tmp_path: Path) -> None:
    crontab = tmp_path / "crontab"
    crontab.write_text("")
    assert CrontabSource(file=crontab).load_noting_blank() == ([], True)
    crontab.write_text("# nothing on purpose\n")
    assert CrontabSource(file=crontab).load_noting_blank() == ([], False)
    assert CrontabSource(text="").load_noting_blank() == ([], False)


def test_a_reload_that_read_an_empty_file_keeps_the_schedule_though_the_file_refilled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crontab = tmp_path / "crontab"
    crontab.write_text(CRONTAB)
    # The reload's read lands between truncate and write; the file is full on disk.
    monkeypatch.setattr(source_module, "read_stable", lambda path: "")
    heard: list[tuple[Any, dict[str, Any]]] = []
    matcher = _Matcher()
    loader = CrontabLoader.start(
        source=CrontabSource(file=crontab),
        crontab_items=parse_crontab(CRONTAB),
        code_items=(),
        matcher=matcher,  # type: ignore[arg-type]
        emit=lambda signal, **payload: heard.append((signal, payload)),
    )
    try:
        assert loader.ask(Reload(), timeout=10) is False
        assert [item.identifier for item in loader.ask(GetItems(), timeout=10)] == [
            "tick",
            "tock",
        ]
    finally:
        loader.stop()
    assert matcher.told == []
    ((signal, payload),) = heard
    assert signal.name == "cron:reloadFailed"
    assert "is empty" in str(payload["error"])
