"""A statement on the jobs table slow enough to suggest stale statistics.

The claimer times its claims and the completer its completions; either one
slower than :data:`SLOW_STATEMENT_S` hints that the planner works from
statistics taken while the table was small, and the claimer may then analyze
it (``ANALYZE_JOBS``). The completer reports its slow statements with
:class:`SlowStatement`; both import this module, not each other.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["SLOW_STATEMENT_S", "SlowStatement"]

#: A claim or complete this slow suggests a plan made from stale statistics (ANALYZE_JOBS).
SLOW_STATEMENT_S = 0.1


class SlowStatement(NamedTuple):
    """The completer's statement took ``seconds``: the jobs table's statistics may be stale."""

    seconds: float
