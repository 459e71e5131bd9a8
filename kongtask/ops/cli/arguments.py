"""Argument parsing shared by the ``kongtask`` command groups: the parser, ``type=`` callables."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import NoReturn

__all__ = ["ArgumentParser", "positive_seconds"]


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line and a hint, not the whole usage block.

    Subcommand parsers inherit the class, so every ``kongtask ...`` command
    answers a bad argument the same way (exit status 2); ``--help`` still
    prints the full usage.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\ntry '{self.prog} --help'\n")


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
