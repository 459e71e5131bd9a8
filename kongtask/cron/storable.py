"""What PostgreSQL will refuse to store for a cron firing, found before anything is written.

A crontab item whose job the database cannot accept (a NUL in its job key or payload,
a job key over 512 characters, a priority outside ``smallint``, ``max=0``) would make
its minute's transaction fail every time it is due. The parser rejects such items up
front with these checks, so ``kongtask crontab check`` and a reload say what is wrong
and where; the scheduler still isolates an item that fails anyway (see
``kongtask.cron.service.writer``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from kongtask.cron.types import ParsedCronItem

__all__ = ["MAX_JOB_KEY_LENGTH", "payload_problem", "text_problem", "unstorable_reason"]

MAX_JOB_KEY_LENGTH = 512  # the jobs table's key check
_MAX_NAME_LENGTH = 128  # task identifiers and queue names
_SMALLINT = (-32768, 32767)


def text_problem(text: str) -> str | None:
    """Why PostgreSQL cannot store ``text`` (a NUL, a lone surrogate), or None."""
    if "\x00" in text:
        return "contains a NUL character (\\u0000), which PostgreSQL cannot store"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone surrogate, which is not valid UTF-8"
    return None


def payload_problem(value: Any, path: str = "payload") -> str | None:
    """Why a JSON payload cannot be stored and read back by the database, or None.

    PostgreSQL's ``json`` type keeps ``\\u0000`` as text but refuses it as soon as a
    value is extracted (graphile-worker's ``add_jobs`` does), and JSON has no NaN.
    """
    if isinstance(value, str):
        problem = text_problem(value)
        return f"{path} {problem}" if problem else None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{path} is {value!r}, which JSON cannot represent"
    if isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(key, str) and (problem := text_problem(key)):
                return f"a key in {path} {problem}"
            if problem := payload_problem(item, f"{path}.{key}"):
                return problem
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            if problem := payload_problem(item, f"{path}[{index}]"):
                return problem
    return None


def unstorable_reason(item: ParsedCronItem) -> str | None:
    """Why the jobs of ``item`` would be refused by the database, or None if they fit."""
    options = item.options
    for label, text in (("task identifier", item.task), ("identifier", item.identifier)):
        if problem := text_problem(text):
            return f"the {label} {problem}"
    if len(item.task) > _MAX_NAME_LENGTH:
        return f"the task identifier is {len(item.task)} characters long; at most 128 fit"
    if options.queue_name is not None and len(options.queue_name) > _MAX_NAME_LENGTH:
        return f"the queue name is {len(options.queue_name)} characters long; at most 128 fit"
    if options.job_key is not None:
        if options.job_key == "":
            return "the job key is empty; PostgreSQL requires 1 to 512 characters"
        if problem := text_problem(options.job_key):
            return f"the job key {problem}"
        if len(options.job_key) > MAX_JOB_KEY_LENGTH:
            return (
                f"the job key is {len(options.job_key)} characters long; "
                f"at most {MAX_JOB_KEY_LENGTH} fit"
            )
    if options.priority is not None and not _SMALLINT[0] <= options.priority <= _SMALLINT[1]:
        return f"priority {options.priority} is outside {_SMALLINT[0]}..{_SMALLINT[1]}"
    if options.max_attempts is not None and not 1 <= options.max_attempts <= _SMALLINT[1]:
        return f"max attempts {options.max_attempts} is outside 1..{_SMALLINT[1]}"
    return payload_problem(item.payload)
