"""Argument checks shared by settings, job specs and the Scheduler.

Each check names the argument in its message and raises the error the caller
asks for: :class:`~kongtask.errors.ConfigurationError` for settings (the
default), :class:`~kongtask.errors.InvalidJobError` for a job's arguments
(pass ``error=job_error``). One implementation, so a rule (say, "booleans are
not integers") holds everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from kongtask.errors import ConfigurationError, InvalidJobError, KongtaskError

__all__ = [
    "ErrorFactory",
    "check_bool",
    "check_clock",
    "check_connection_string",
    "check_int",
    "check_seconds",
    "check_text",
    "configuration_error",
    "job_error",
]

#: Builds the exception to raise from (message, argument name, value given).
ErrorFactory = Callable[[str, str, Any], KongtaskError]


def configuration_error(message: str, name: str, value: Any) -> KongtaskError:
    """A :class:`ConfigurationError` naming the setting."""
    return ConfigurationError(message, name=name, value=value)


def job_error(message: str, name: str, value: Any) -> KongtaskError:
    """An :class:`InvalidJobError` naming the job's field."""
    return InvalidJobError(message, field=name, value=value)


def check_int(
    name: str, value: Any, low: int, high: int, *, error: ErrorFactory = configuration_error
) -> None:
    """An ``int`` (not a ``bool``) within ``low..high``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{name} must be an integer, got {value!r}", name, value)
    if not low <= value <= high:
        raise error(f"{name} must be between {low} and {high}, got {value}", name, value)


def check_seconds(
    name: str,
    value: Any,
    *,
    minimum: float = 0.0,
    allow_minimum: bool = True,
    error: ErrorFactory = configuration_error,
) -> None:
    """A finite number of seconds, at least ``minimum`` (or above it, if not ``allow_minimum``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise error(f"{name} must be a number of seconds, got {value!r}", name, value)
    if not math.isfinite(value) or value < minimum or (value == minimum and not allow_minimum):
        bound = f"{minimum:g} or more" if allow_minimum else f"more than {minimum:g}"
        if minimum == 0:
            bound = "zero or more" if allow_minimum else "more than zero"
        raise error(
            f"{name} must be a finite number of seconds, {bound}; got {value!r}", name, value
        )


def check_bool(name: str, value: Any, *, error: ErrorFactory = configuration_error) -> None:
    """Exactly ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise error(f"{name} must be True or False, got {value!r}", name, value)


def check_text(
    name: str,
    value: Any,
    *,
    max_length: int | None = None,
    required: bool = True,
    error: ErrorFactory = configuration_error,
) -> None:
    """A non-empty string PostgreSQL can store (no NUL, no lone surrogate), at most
    ``max_length`` characters; ``None`` passes unless ``required``."""
    if value is None:
        if required:
            raise error(f"{name} is required", name, value)
        return
    if not isinstance(value, str):
        raise error(f"{name} must be a string, got {type(value).__name__}", name, value)
    if not value:
        raise error(f"{name} must not be empty", name, value)
    if "\x00" in value:
        raise error(f"{name} must not contain NUL characters", name, value)
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            # A lone surrogate cannot be sent to PostgreSQL at all.
            raise error(
                f"{name} is not valid Unicode text (lone surrogate at position {exc.start})",
                name,
                value,
            ) from None
    if max_length is not None and len(value) > max_length:
        raise error(
            f"{name} is {len(value)} characters long; at most {max_length} are allowed",
            name,
            value,
        )


def check_connection_string(
    value: Any,
    *,
    name: str = "connection_string",
    allow_none: bool = True,
    allow_empty: bool = True,
    alternatives: tuple[str, ...] = (),
) -> None:
    """A connection string (``None`` passes if ``allow_none``); ``alternatives`` names the
    other kinds the caller takes, such as ``"a psycopg.Connection"``, for the message.

    The error never carries the value: a connection string may hold a password.
    """
    if value is None and allow_none:
        return
    if isinstance(value, str) and (value or allow_empty):
        return
    kinds = ["a string" if allow_empty else "a non-empty connection string", *alternatives]
    if allow_none:
        kinds.append("None")
    expected = kinds[0] if len(kinds) == 1 else f"{', '.join(kinds[:-1])} or {kinds[-1]}"
    got = "an empty string" if value == "" else type(value).__name__
    raise ConfigurationError(f"{name} must be {expected}, got {got}", name=name, value=None)


def check_clock(clock: Any) -> None:
    """``None`` or an object with the :class:`kongtask.protocols.Clock` methods."""
    if clock is not None and not all(
        callable(getattr(clock, name, None)) for name in ("now", "monotonic", "call_later")
    ):
        raise ConfigurationError(
            "clock must have now(), monotonic() and call_later() (kongtask.protocols.Clock)",
            name="clock",
            value=clock,
        )
