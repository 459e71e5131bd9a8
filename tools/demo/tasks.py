"""Example task handlers for the README's quick start."""

from __future__ import annotations

from typing import Any


def hello(payload: dict[str, Any], helpers: Any) -> None:
    """Greet whoever the payload names; cron firings carry their timestamp in ``_cron``."""
    name = payload.get("name", "world")
    fired = payload.get("_cron", {}).get("ts")
    suffix = f" (cron firing {fired})" if fired else ""
    helpers.logger.info("Hello, %s!%s", name, suffix)
