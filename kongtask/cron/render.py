"""Write a parsed cron item back as a crontab line.

Used to show users the normalised form of what they configured and to prove the
parser by round trips: ``parse_crontab(render_cron_item(item))`` gives an equal item.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from urllib.parse import quote

from kongtask.cron.options import ID_RE, JOB_KEY_RE, QUEUE_RE
from kongtask.cron.types import FIELDS, ParsedCronItem
from kongtask.errors import CrontabError

__all__ = ["render_cron_item"]

_TASK_RE = re.compile(r"[_a-zA-Z][_a-zA-Z0-9:/_-]*")
_UNITS = (("w", 604_800), ("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1))


def _field(values: tuple[int, ...], low: int, high: int) -> str:
    if len(values) == high - low + 1:
        return "*"
    return ",".join(str(value) for value in values)


def _time_phrase(period: timedelta) -> str:
    seconds, rest = divmod(period, timedelta(seconds=1))
    if rest:
        raise ValueError(f"backfill period {period} is not a whole number of seconds")
    parts = []
    for unit, size in _UNITS:
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def _options_text(item: ParsedCronItem) -> str:
    options = item.options
    pairs: list[tuple[str, str]] = []
    if item.identifier != item.task:
        if not ID_RE.fullmatch(item.identifier):
            raise ValueError(f"identifier {item.identifier!r} is not valid in a crontab")
        pairs.append(("id", item.identifier))
    if options.backfill_period:
        pairs.append(("fill", _time_phrase(options.backfill_period)))
    if options.max_attempts is not None:
        pairs.append(("max", str(options.max_attempts)))
    if options.queue_name is not None:
        if not QUEUE_RE.fullmatch(options.queue_name):
            raise ValueError(f"queue name {options.queue_name!r} is not valid in a crontab")
        pairs.append(("queue", options.queue_name))
    if options.job_key is not None:
        if not JOB_KEY_RE.fullmatch(options.job_key):
            raise ValueError("a job key with line breaks cannot be written in a crontab")
        pairs.append(("jobKey", options.job_key))
    if options.job_key_mode is not None:
        pairs.append(("jobKeyMode", options.job_key_mode))
    if options.priority is not None:
        pairs.append(("priority", str(options.priority)))
    if options.tz is not None:
        pairs.append(("tz", options.tz))
    if options.no_overlap:
        pairs.append(("noOverlap", "true"))
    if options.skip_dates:
        pairs.append(("skipDates", ",".join(day.isoformat() for day in options.skip_dates)))
    return "&".join(f"{key}={quote(value, safe=',')}" for key, value in pairs)


def render_cron_item(item: ParsedCronItem) -> str:
    """Return a crontab line that parses back to an item equal to ``item``.

    Raises ``CrontabError`` for items a crontab cannot express (an identifier or queue
    name outside the option grammar, a sub-second backfill period, ...).
    """
    try:
        if not _TASK_RE.fullmatch(item.task):
            raise ValueError(f"task {item.task!r} is not a valid crontab task identifier")
        values = (item.minutes, item.hours, item.dates, item.months, item.dows)
        parts = [_field(v, spec.low, spec.high) for v, spec in zip(values, FIELDS, strict=True)]
        parts.append(item.task)
        options = _options_text(item)
        if options:
            parts.append(f"?{options}")
        if item.payload is not None:
            payload = json.dumps(item.payload, ensure_ascii=False, separators=(",", ":"))
            # JavaScript's "." (and so the line grammar) stops at these two.
            parts.append(payload.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))
    except (ValueError, TypeError) as error:  # UnicodeEncodeError is a ValueError
        raise CrontabError(
            f"Cannot write cron item {item.identifier!r} as a crontab line: {error}"
        ) from None
    return " ".join(parts)
