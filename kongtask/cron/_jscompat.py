"""JavaScript string semantics that the crontab grammar depends on.

graphile-worker parses crontabs with JavaScript regular expressions, ``String.trim``,
``parseInt`` and Node's ``querystring.parse``. Python's ``\\s``, ``.``, ``str.strip``
and ``urllib.parse`` differ at the edges (Unicode spaces, lone ``\\r``, huge numbers,
malformed percent escapes), so these helpers reproduce the JavaScript behaviour that
decides whether a line is accepted and what an error message says.
"""

from __future__ import annotations

import re

__all__ = [
    "JS_DOT",
    "JS_WS",
    "js_number_text",
    "js_parse_int",
    "js_trim",
    "node_querystring_parse",
]

#: The characters of JavaScript's ``\s`` (WhiteSpace and LineTerminator), as a class body.
JS_WS = "\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
#: JavaScript's ``.`` without the ``s`` flag: anything but a line terminator.
JS_DOT = "[^\n\r\u2028\u2029]"

_TRIM = re.compile(f"^[{JS_WS}]+|[{JS_WS}]+$")
_HEX_ESCAPE = re.compile(r"%[0-9a-fA-F]{2}")
_ESCAPE_RUN = re.compile(r"(?:%[0-9a-fA-F]{2})+")
_ARRAY_INDEX = re.compile(r"0|[1-9][0-9]*")
_MAX_KEYS = 1000


def js_trim(text: str) -> str:
    """Return ``text.trim()`` as JavaScript computes it."""
    return _TRIM.sub("", text)


def js_parse_int(digits: str) -> float:
    """Return ``parseInt(digits, 10)`` for a string of ASCII digits (a double, maybe ``inf``)."""
    return float(digits)


def js_number_text(value: float) -> str:
    """Format a non-negative integral double the way JavaScript's ``String(n)`` does."""
    if value == float("inf"):
        return "Infinity"
    if value < 1e21:
        return str(int(value)) if value < 2**53 else _shortest_integer_text(value)
    mantissa, _, exponent = repr(value).partition("e")
    mantissa = mantissa.removesuffix(".0")
    return f"{mantissa}e+{int(exponent)}"


def _shortest_integer_text(value: float) -> str:
    # JavaScript prints the shortest round-tripping digits, padded with zeros.
    mantissa, _, exponent = repr(value).partition("e")
    if not exponent:
        return mantissa.removesuffix(".0")
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).rstrip("0") or "0"
    return digits + "0" * (int(exponent) + 1 - len(digits))


def _utf16_units(text: str) -> list[int]:
    data = text.encode("utf-16-le", "surrogatepass")
    return [data[i] | (data[i + 1] << 8) for i in range(0, len(data), 2)]


def _decode_uri_component(text: str) -> str | None:
    """``decodeURIComponent``; ``None`` where JavaScript would throw a URIError."""
    if text.count("%") != len(_HEX_ESCAPE.findall(text)):
        return None
    try:
        return _ESCAPE_RUN.sub(
            lambda m: bytes.fromhex(m.group(0).replace("%", "")).decode("utf-8"), text
        )
    except UnicodeDecodeError:
        return None


def _unescape_buffer(text: str) -> str:
    """Node's lenient fallback: valid ``%XX`` become bytes, other code units keep their low byte."""
    units = _utf16_units(text)
    out = bytearray()
    i = 0
    while i < len(units):
        unit = units[i]
        if unit == 0x25 and i + 2 < len(units) and _is_hex(units[i + 1]) and _is_hex(units[i + 2]):
            out.append(int(chr(units[i + 1]) + chr(units[i + 2]), 16))
            i += 3
            continue
        out.append(unit & 0xFF)
        i += 1
    return out.decode("utf-8", "replace")


def _is_hex(unit: int) -> bool:
    return unit < 128 and chr(unit) in "0123456789abcdefABCDEF"


def _unescape(raw: str) -> str:
    text = raw.replace("+", " ")
    if not _HEX_ESCAPE.search(raw):
        return text
    decoded = _decode_uri_component(text)
    return decoded if decoded is not None else _unescape_buffer(text)


def node_querystring_parse(text: str) -> list[tuple[str, str | list[str]]]:
    """Return ``Object.entries(querystring.parse(text))`` as Node 20 computes it.

    Repeated keys give a list; only the first 1000 ``&``-separated parts count; keys
    that look like array indexes come first in ascending order (JavaScript's property
    order), the rest in order of first appearance.
    """
    result: dict[str, str | list[str]] = {}
    if not text:
        return []
    for segment in text.split("&")[:_MAX_KEYS]:
        if not segment:
            continue
        raw_key, _, raw_value = segment.partition("=")
        key, value = _unescape(raw_key), _unescape(raw_value)
        existing = result.get(key)
        if existing is None:
            result[key] = value
        elif isinstance(existing, list):
            existing.append(value)
        else:
            result[key] = [existing, value]
    indexes = sorted(
        (k for k in result if _ARRAY_INDEX.fullmatch(k) and int(k) < 2**32 - 1), key=int
    )
    index_set = set(indexes)
    ordered = indexes + [k for k in result if k not in index_set]
    return [(k, result[k]) for k in ordered]
