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
        (["--vacuum-after-dead-rows", "20000"], {"vacuum_after_dead_rows": 20_000}),
        (["--vacuum-after-dead-rows", "0"], {"vacuum_after_dead_rows": None}),
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
    for name in ("size_claims", "local_queue_size", "vacuum_after_dead_rows"):
        assert options.get(name, "unset") == expected.get(name, "unset")


@pytest.mark.parametrize("value", ["500", "-1", "many", "2000000000"])
def test_a_bad_vacuum_threshold_is_refused_naming_the_flag(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["-c", "postgresql://nobody@127.0.0.1:1/none", "--vacuum-after-dead-rows", value])
    assert info.value.code == 2
    assert "--vacuum-after-dead-rows" in capsys.readouterr().err
