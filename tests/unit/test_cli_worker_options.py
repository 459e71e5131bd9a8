"""The worker's command line passes its claim options on to the Runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import kongtask.ops.cli.main as cli
import kongtask.runner


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], {}),
        (["--no-size-claims"], {"size_claims": False}),
        (["--local-queue-size", "7"], {"local_queue_size": 7}),
    ],
)
def test_claim_flags_reach_the_runner_options(
    flags: list[str], expected: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tasks = tmp_path / "tasks.py"
    tasks.write_text("def hello(payload, helpers):\n    return None\n")
    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(kongtask.runner, "run_once", lambda **options: seen.append(options))
    # The command line sets up kongtask's logging for the process; leave the test's alone.
    monkeypatch.setattr(cli, "configure_logs", lambda *args, **kwargs: None)
    argv = ["-c", "postgresql://nobody@127.0.0.1:1/none", "--tasks", str(tasks), "--once"]
    assert cli.main([*argv, "--no-crontab", *flags]) == 0
    (options,) = seen
    for name in ("size_claims", "local_queue_size"):
        assert options.get(name) == expected.get(name)
