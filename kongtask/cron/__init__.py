"""Crontab parsing and matching: pure functions over text and UTC minutes.

No database, no threads: the scheduler actors feed minutes in and get the due
items back (see :class:`CronIndex` for the bulk path).
"""

from typing import TYPE_CHECKING

from kongtask import _lazy

if TYPE_CHECKING:
    from kongtask.cron.index import CronIndex
    from kongtask.cron.matcher import (
        digest,
        fire_times,
        matches,
        next_fire_times,
    )
    from kongtask.cron.options import (
        parse_options,
        time_phrase_to_timedelta,
    )
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

# Imported when first read (see kongtask._lazy): importing one cron module
# does not import the others.
__getattr__, __dir__ = _lazy.exports(
    __name__,
    {
        "kongtask.cron.index": ("CronIndex",),
        "kongtask.cron.matcher": ("digest", "fire_times", "matches", "next_fire_times"),
        "kongtask.cron.options": ("parse_options", "time_phrase_to_timedelta"),
        "kongtask.cron.parser": (
            "NICKNAMES",
            "parse_cron_item",
            "parse_cron_items",
            "parse_crontab",
            "validate_pattern",
        ),
        "kongtask.cron.render": ("render_cron_item",),
        "kongtask.cron.types": (
            "CronItem",
            "CronItemOptions",
            "Firing",
            "ParsedCronItem",
            "TimestampDigest",
        ),
    },
)
