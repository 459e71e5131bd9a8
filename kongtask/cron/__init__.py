"""Crontab parsing and matching: pure functions over text and UTC minutes.

No database, no threads: the scheduler actors feed minutes in and get the due
items back (see :class:`CronIndex` for the bulk path).
"""

from kongtask.cron.index import CronIndex
from kongtask.cron.matcher import digest, fire_times, matches, next_fire_times
from kongtask.cron.options import parse_options, time_phrase_to_timedelta
from kongtask.cron.parser import (
    NICKNAMES,
    parse_cron_item,
    parse_cron_items,
    parse_crontab,
    validate_pattern,
)
from kongtask.cron.render import render_cron_item
from kongtask.cron.types import (
    CronItem,
    CronItemOptions,
    Firing,
    ParsedCronItem,
    TimestampDigest,
)

__all__ = [
    "NICKNAMES",
    "CronIndex",
    "CronItem",
    "CronItemOptions",
    "Firing",
    "ParsedCronItem",
    "TimestampDigest",
    "digest",
    "fire_times",
    "matches",
    "next_fire_times",
    "parse_cron_item",
    "parse_cron_items",
    "parse_crontab",
    "parse_options",
    "render_cron_item",
    "time_phrase_to_timedelta",
    "validate_pattern",
]
