"""What kongtask writes into a job's ``last_error``: readable text the database always accepts.

A handler's exception is arbitrary: its message may hold a NUL byte (PostgreSQL
text cannot), lone surrogates (not encodable as UTF-8), megabytes of text, or
its ``__str__`` may raise. Every failure message passes through
:func:`sanitize_last_error` once before it is stored, so one bad exception can
fail only its own job and never the statement that records a whole batch.
"""

from __future__ import annotations

__all__ = ["MAX_LAST_ERROR_CHARS", "last_error_text", "sanitize_last_error"]

#: The longest ``last_error`` kongtask writes, in characters (the marker included).
MAX_LAST_ERROR_CHARS = 10_000

# Room kept at the end of a truncated message for the marker saying how much was cut.
_MARKER_ROOM = 64


def sanitize_last_error(text: object) -> str:
    """Return ``text`` as a ``last_error`` PostgreSQL will store.

    NUL characters become the four characters ``\\x00``; characters UTF-8
    cannot encode (lone surrogates) become their ``\\udcff``-style escapes;
    text over :data:`MAX_LAST_ERROR_CHARS` keeps its beginning and ends with
    ``… [truncated: N more characters]``. Applying it twice changes nothing.
    """
    if not isinstance(text, str):
        text = _safe_str(text) or type(text).__name__
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > MAX_LAST_ERROR_CHARS:
        keep = MAX_LAST_ERROR_CHARS - _MARKER_ROOM
        text = f"{text[:keep]}… [truncated: {len(text) - keep} more characters]"
    return text


def last_error_text(error: BaseException) -> str:
    """The ``last_error`` for a handler's exception: its message, else its type's name.

    A ``LookupError`` keeps its bare first argument (``str(KeyError("x"))``
    would add quotes); an ``__str__`` that raises, anything at all, gives the
    type's name instead of failing the worker.
    """
    if isinstance(error, LookupError) and error.args and isinstance(error.args[0], str):
        text = error.args[0]
    else:
        text = _safe_str(error)
    return sanitize_last_error(text if text else _type_name(error))


def _safe_str(value: object) -> str:
    """``str(value)``, or ``""`` when that raises (even ``SystemExit``) or is not a str."""
    try:
        text = str(value)
    except BaseException:  # a hostile __str__ must not take the worker down
        return ""
    return text if isinstance(text, str) else ""


def _type_name(value: object) -> str:
    try:
        return type(value).__name__
    except BaseException:
        return "Exception"
