"""``kongtask dashboard``."""

from collections.abc import Sequence


def main(argv: Sequence[str]) -> int:
    """Serve the dashboard."""
    raise NotImplementedError
