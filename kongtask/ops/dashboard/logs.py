"""Hiding the dashboard's token in whatever the dashboard or its server logs."""

from __future__ import annotations

import re
from urllib.parse import quote, unquote_plus

from kongtask.db.conninfo import REDACTED

__all__ = ["hide_token"]

# One query parameter (name=value) in a URL, as it appears quoted in a log line.
_QUERY_PARAMETER = re.compile(r"(?P<head>[?&](?P<name>[^=&\s'\"#]*)=)(?P<value>[^&\s'\"#]*)")


def hide_token(text: str, token: str | None = None) -> str:
    """``text`` with the value of every ``token`` query parameter (and ``token`` itself) hidden.

    The name is compared decoded, as the dashboard reads it (``%74oken`` is
    ``token`` too); a wrong token is hidden as well, since it may be a typo of
    the right one.
    """

    def hide(match: re.Match[str]) -> str:
        if unquote_plus(match["name"]).strip().lower() != "token":
            return match[0]
        return match["head"] + REDACTED

    text = _QUERY_PARAMETER.sub(hide, text)
    if token:
        text = text.replace(token, REDACTED).replace(quote(token, safe=""), REDACTED)
    return text
