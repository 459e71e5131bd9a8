"""Which errors the cron writer treats as one item's fault (isolated) rather than the database's."""

from __future__ import annotations

import psycopg

from kongtask import InvalidJobError
from kongtask.cron.service.writer import is_item_fault


def test_a_value_jobspec_refuses_is_an_item_fault() -> None:
    # The firing's JobSpec refuses it before anything is sent: isolate the item.
    assert is_item_fault(InvalidJobError("payload is not JSON-serialisable", field="payload"))


def test_other_errors_fail_the_whole_write() -> None:
    assert not is_item_fault(psycopg.OperationalError("connection lost"))
    assert not is_item_fault(RuntimeError("a bug"))
