"""Calls mypy must refuse: tests/unit/test_runner_options.py checks each line marked ``refused``.

Never imported or run; it exists to be type-checked.
"""

from typing import Any

import kongtask
from kongtask.testing import running


def noop(payload: Any, helpers: Any) -> None:
    """A task handler."""


kongtask.run(tasks={"noop": noop}, concurency=2)  # refused: misspelt option
kongtask.run_once(tasks={"noop": noop}, concurrency="2")  # refused: wrong type
kongtask.Runner(tasks={"noop": noop}, metrics_prt=9400)  # refused: misspelt option
kongtask.run(concurrency=2)  # refused: tasks missing
with running(tasks={"noop": noop}, settings=kongtask.ConnectionSettings()):  # refused: wrong type
    pass
kongtask.run(
    tasks={"noop": noop},
    settings=kongtask.WorkerSettings(concurrency=2),
    connection=kongtask.ConnectionSettings(pgbouncer=True),
    ops=kongtask.OpsSettings(metrics_port=9400),
)
