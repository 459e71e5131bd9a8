"""The API reference page names every export, and the CLI reference renders every command.

The site build (``mkdocs build --strict`` in CI) turns each ``::: name`` into the
docstrings; these checks make a new export or command group fail here, by name,
before anyone reads a page without it.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import kongtask
from kongtask.ops.cli.main import GROUPS

ROOT = Path(__file__).resolve().parents[2]


def load_hook() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cli_hook", ROOT / "tools" / "mkdocs_hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_export_is_on_the_api_page() -> None:
    page = (ROOT / "docs" / "reference" / "api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^::: kongtask\.(\w+)$", page, re.MULTILINE))
    missing = set(kongtask.__all__) - documented - {"__version__", "events"}
    assert not missing, f"docs/reference/api.md lacks ::: kongtask.NAME for {sorted(missing)}"
    assert documented <= set(kongtask.__all__), documented - set(kongtask.__all__)


def test_the_cli_reference_renders_every_command_and_subcommand() -> None:
    text = load_hook().render()
    headings = re.findall(r"^## `(kongtask[^`]*)`$", text, re.MULTILINE)
    assert "kongtask" in headings
    for group in GROUPS:
        assert f"kongtask {group}" in headings, group
    for command in ("kongtask jobs cancel", "kongtask cron run", "kongtask admin unlock-dead"):
        assert command in headings, command
    assert "--metrics-port PORT" in text  # the worker's own help, as argparse prints it


def test_the_events_reference_has_a_row_for_every_signal() -> None:
    from kongtask import events

    rows = load_hook().render_events().splitlines()
    assert len(rows) == len(events.EVENT_NAMES)
    for event, row in zip(events.EVENT_NAMES, rows, strict=True):
        assert row.startswith(f"- `{event}` (`events.") and "ayload" in row, row
    assert "- `job:failed` (`events.job_failed`): A job failed" in "\n".join(rows)
