"""Cron item options: the ``?k=v&k=v`` part of a crontab line and programmatic options.

The crontab rules, keys and messages are graphile-worker's (values are decoded with
Node ``querystring`` semantics before they are checked). kongtask adds ``tz`` — a
Node worker cannot read it — and, unlike graphile-worker, checks the options of
programmatic items by the same rules.
"""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Callable, Mapping
from datetime import date, datetime, timedelta
from typing import Any

from kongtask.cron._jscompat import JS_DOT, node_querystring_parse
from kongtask.cron.types import CronItemOptions
from kongtask.errors import CrontabError

__all__ = [
    "KONGTASK_OPTION_KEYS",
    "kongtask_option_keys",
    "options_from_mapping",
    "parse_crontab_options",
    "parse_options",
    "time_phrase_to_timedelta",
]

ID_RE = re.compile(r"[_a-zA-Z][-_a-zA-Z0-9]*")
_FILL_RE = re.compile(r"(?:[0-9]+[smhdw])+")
_TIME_PHRASE_PART = re.compile(r"([0-9]+)([smhdw])")
_MAX_RE = re.compile(r"[0-9]+")
QUEUE_RE = re.compile(r"[-a-zA-Z0-9_:]+")
JOB_KEY_RE = re.compile(f"{JS_DOT}*")
_JOB_KEY_MODE_RE = re.compile(r"replace|preserve_run_at")
_PRIORITY_RE = re.compile(r"-?[0-9]+")
# IANA names only: keeps absolute paths and ".." away from the zoneinfo file lookup.
_TZ_RE = re.compile(r"[A-Za-z][-+_A-Za-z0-9]*(?:/[-+_A-Za-z0-9]+)*")
_VALUE_RES = {
    "id": ID_RE,
    "fill": _FILL_RE,
    "max": _MAX_RE,
    "queue": QUEUE_RE,
    "jobKey": JOB_KEY_RE,
    "jobKeyMode": _JOB_KEY_MODE_RE,
    "priority": _PRIORITY_RE,
    "tz": _TZ_RE,  # kongtask-only, like the two rules below
    "noOverlap": re.compile(r"true|false"),
    "skipDates": re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}(?:,[0-9]{4}-[0-9]{2}-[0-9]{2})*"),
}
#: Option keys only kongtask reads (a Node worker refuses a line that uses one).
KONGTASK_OPTION_KEYS = ("tz", "noOverlap", "skipDates")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_BASELINE_KEYS = ("id", "fill", "max", "queue", "jobKey", "jobKeyMode", "priority")
# graphile-worker's message lists its own keys; kongtask lists every key it reads.
_SUPPORTED_TEXT = "'" + "', '".join(_BASELINE_KEYS + KONGTASK_OPTION_KEYS) + "'"
JOB_KEY_MODES = ("replace", "preserve_run_at")


def _ms_to_timedelta(milliseconds: int) -> timedelta:
    # Absurd periods (millions of years) are accepted like graphile-worker does and
    # mean "as far back as possible"; timedelta cannot hold them.
    try:
        return timedelta(milliseconds=milliseconds)
    except OverflowError:
        return timedelta.max


def time_phrase_to_timedelta(phrase: str) -> timedelta:
    """Return the period a time phrase like ``"4w3d2h1m"`` names (s, m, h, d, w units)."""
    remaining = phrase
    milliseconds = 0
    while remaining:
        part = _TIME_PHRASE_PART.match(remaining)
        if part is None:
            raise CrontabError(f"Invalid time phrase '{phrase}', did not understand '{remaining}'")
        milliseconds += int(part.group(1)) * _UNIT_MS[part.group(2)]
        remaining = remaining[part.end() :]
    return _ms_to_timedelta(milliseconds)


def is_known_zone(name: str) -> bool:
    """Whether ``name`` is an IANA time zone that zoneinfo can load."""
    if not _TZ_RE.fullmatch(name):
        return False
    try:
        zoneinfo.ZoneInfo(name)
    except Exception:  # ZoneInfoNotFoundError, ValueError, OSError for odd names
        return False
    return True


def parse_crontab_options(
    text: str | None, line_number: int, column: int | None
) -> tuple[CronItemOptions, str | None]:
    """Parse a crontab line's options into options and the ``id`` (if given)."""
    values: dict[str, Any] = {}
    identifier: str | None = None

    def fail(message: str) -> CrontabError:
        return CrontabError(message, line=line_number, column=column)

    for key, value in node_querystring_parse(text or ""):
        if not isinstance(value, str):
            raise fail(
                f"Options on line {line_number} of crontab contains invalid value for"
                f" '{key}', did you specify it more than once?"
            )
        if key not in _BASELINE_KEYS and key not in KONGTASK_OPTION_KEYS:
            raise fail(
                f"Options on line {line_number} of crontab contains unsupported key '{key}';"
                f" supported keys are: {_SUPPORTED_TEXT}."
            )
        valid = _VALUE_RES[key].fullmatch(value)
        if key == "tz" and valid and not is_known_zone(value):
            raise fail(
                f"Options on line {line_number} of crontab contains invalid value for 'tz',"
                f" value '{value}' is not a known time zone."
            )
        if not valid:
            raise fail(
                f"Options on line {line_number} of crontab contains invalid value for"
                f" '{key}', value '{value}' is not compatible with this option."
            )
        if key == "skipDates":
            dates = _dates(value)
            if dates is None:
                raise fail(
                    f"Options on line {line_number} of crontab contains invalid value for"
                    f" 'skipDates', value '{value}' is not a list of YYYY-MM-DD dates."
                )
            values["skip_dates"] = dates
        elif key == "noOverlap":
            values["no_overlap"] = value == "true"
        elif key == "id":
            identifier = value
        elif key == "fill":
            values["backfill_period"] = time_phrase_to_timedelta(value)
        elif key in ("max", "priority"):
            values["max_attempts" if key == "max" else "priority"] = int(value)
        else:
            name = {"queue": "queue_name", "jobKey": "job_key", "jobKeyMode": "job_key_mode"}
            values[name.get(key, key)] = value
    return CronItemOptions(**values), identifier


def _dates(text: str) -> tuple[date, ...] | None:
    try:
        return tuple(sorted({date.fromisoformat(part) for part in text.split(",")}))
    except ValueError:
        return None


def kongtask_option_keys(text: str | None) -> list[str]:
    """The kongtask-only keys used in a crontab line's options text (already validated)."""
    keys = {key for key, _ in node_querystring_parse(text or "")}
    return [key for key in KONGTASK_OPTION_KEYS if key in keys]


def parse_options(options: str | Mapping[str, Any] | CronItemOptions | None) -> CronItemOptions:
    """Parse cron item options from crontab text (``"?fill=1h&max=3"``, the ``?`` optional)
    or from a mapping of option names; raises ``CrontabError`` naming the bad option.

    An ``id`` in the text is refused here: it names the item, not its jobs.
    """
    if options is None or isinstance(options, CronItemOptions | Mapping):
        return options_from_mapping(options, "parse_options call")
    if not isinstance(options, str):
        raise CrontabError(
            f"parse_options takes crontab option text or a mapping, not {type(options).__name__}"
        )
    parsed, identifier = parse_crontab_options(options.removeprefix("?"), 1, 1)
    if identifier is not None:
        raise CrontabError("parse_options cannot take 'id': it names the item, not its jobs")
    return parsed


def _check_backfill(value: Any) -> timedelta | None:
    if isinstance(value, timedelta):
        return value if value >= timedelta(0) else None
    if isinstance(value, str):
        return time_phrase_to_timedelta(value) if _FILL_RE.fullmatch(value) else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return _ms_to_timedelta(value)
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_str_like(pattern: re.Pattern[str]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, str) and pattern.fullmatch(value) is not None


_PROGRAMMATIC_CHECKS: dict[str, Callable[[Any], bool]] = {
    "max_attempts": lambda v: _is_int(v) and v >= 0,
    "queue_name": _is_str_like(QUEUE_RE),
    "priority": _is_int,
    "job_key": _is_str_like(JOB_KEY_RE),
    "job_key_mode": lambda v: v in JOB_KEY_MODES,
    "tz": lambda v: isinstance(v, str) and is_known_zone(v),
    "no_overlap": lambda v: isinstance(v, bool),
    "skip_dates": lambda v: (
        isinstance(v, tuple | list)
        and all(isinstance(d, date) and not isinstance(d, datetime) for d in v)
    ),
}
_ALIASES = {
    "backfillPeriod": "backfill_period",
    "maxAttempts": "max_attempts",
    "queueName": "queue_name",
    "jobKey": "job_key",
    "jobKeyMode": "job_key_mode",
    "noOverlap": "no_overlap",
    "skipDates": "skip_dates",
}


def options_from_mapping(
    options: CronItemOptions | Mapping[str, Any] | None, source: str
) -> CronItemOptions:
    """Validate programmatic options (a mapping or ``CronItemOptions``) by the crontab rules.

    ``backfill_period`` may be a ``timedelta``, a time phrase or whole milliseconds
    (graphile-worker's unit); ``None`` values mean "not set".
    """
    if options is None:
        return CronItemOptions()
    if isinstance(options, CronItemOptions):
        given = {name: getattr(options, name) for name in CronItemOptions.__slots__}
    elif isinstance(options, Mapping):
        given = {}
        for key, value in options.items():
            name = _ALIASES.get(key, key) if isinstance(key, str) else key
            if name not in CronItemOptions.__slots__:
                raise CrontabError(
                    f"Unsupported option {key!r} in {source}; supported options are:"
                    f" {', '.join(CronItemOptions.__slots__)}."
                )
            given[name] = value
    else:
        raise CrontabError(
            f"Invalid 'options' in {source}: expected a mapping or CronItemOptions,"
            f" got {type(options).__name__}"
        )
    checked: dict[str, Any] = {}
    for name, value in given.items():
        if value is None:
            continue
        if name == "backfill_period":
            ok_value = _check_backfill(value)
            if ok_value is None:
                raise _bad_option(name, value, source)
            checked[name] = ok_value
        elif name == "skip_dates" and isinstance(value, str):
            dates = _dates(value)
            if dates is None:
                raise _bad_option(name, value, source)
            checked[name] = dates
        elif _PROGRAMMATIC_CHECKS[name](value):
            checked[name] = tuple(sorted(set(value))) if name == "skip_dates" else value
        else:
            raise _bad_option(name, value, source)
    return CronItemOptions(**checked)


def _bad_option(name: str, value: Any, source: str) -> CrontabError:
    hint = " (not a known time zone)" if name == "tz" else ""
    return CrontabError(
        f"Invalid value for option '{name}' in {source}: {value!r} is not compatible"
        f" with this option{hint}."
    )
