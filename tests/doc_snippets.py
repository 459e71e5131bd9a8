"""Collect the fenced Python blocks of the documentation pages, and how each is to be run.

A block is run unless the HTML comment on the line just above its fence says
otherwise:

- ``<!-- snippet: skip REASON -->``: not run; the reason is required.
- ``<!-- snippet: pytest -->``: a pytest module, run by a child pytest whose
  kongtask plugin uses the test's database server.
- ``<!-- kongtask: the test suite runs this example -->``: the pytest plugin
  example, which ``tests/integration/test_pytest_plugin.py`` runs (three times).

Every other block of a page runs in order in one namespace, as a reader pastes
them one after the other into one file. The pages write their database as
:data:`PAGE_DATABASE`; the test puts its own database in its place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The pages whose every Python block is tested.
PAGES = ("README.md", "docs/getting-started.md", "docs/frameworks.md", "docs/testing.md")
#: The connection string the pages use; replaced by the test database's.
PAGE_DATABASE = "postgresql://localhost/app"
PLUGIN_MARKER = "<!-- kongtask: the test suite runs this example -->"

_FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
_DIRECTIVE = re.compile(r"<!-- snippet: (\w+)(.*?)-->")


@dataclass(frozen=True)
class Snippet:
    """One fenced Python block: its page, line, code and how it runs (run, pytest, skip, plugin)."""

    page: str
    line: int
    code: str
    mode: str
    reason: str = ""

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def snippets(page: str) -> list[Snippet]:
    """The Python blocks of ``page`` (relative to the repository), in order."""
    text = (ROOT / page).read_text(encoding="utf-8")
    found = []
    for match in _FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        mode, reason = "run", ""
        if before == PLUGIN_MARKER:
            mode, reason = "plugin", "run by tests/integration/test_pytest_plugin.py"
        elif (directive := _DIRECTIVE.fullmatch(before)) is not None:
            mode, reason = directive.group(1), directive.group(2).strip()
            if mode not in ("skip", "pytest"):
                raise ValueError(f"{page}:{line}: unknown snippet directive {mode!r}")
            if mode == "skip" and not reason:
                raise ValueError(f"{page}:{line}: a skipped snippet must say why")
        found.append(Snippet(page, line, match.group(1), mode, reason))
    return found
