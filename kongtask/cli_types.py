"""Argument types shared by the ``kongtask`` command groups (argparse ``type=`` callables)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["positive_seconds"]


def positive_seconds(flag: str) -> Callable[[str], float]:
    """Parse a finite number of seconds above zero; the error names ``flag``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{flag} expects a number of seconds, got {text!r}"
            ) from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"{flag} must be more than 0 seconds, got {text}")
        return value

    return parse
