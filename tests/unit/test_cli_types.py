"""Argument types of the command line name the flag they reject."""

from __future__ import annotations

import argparse

import pytest

from kongtask.ops.cli.arguments import positive_seconds


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "ten"])
def test_bad_seconds_are_refused_naming_the_flag(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="--connect-timeout"):
        positive_seconds("--connect-timeout")(text)


def test_seconds_may_be_fractional() -> None:
    assert positive_seconds("--statement-timeout")("2.5") == 2.5
