"""Every Python block of the getting-started, frameworks and testing pages (and the README)
runs against PostgreSQL: a page's blocks in order in one namespace, a pytest block in a
child pytest, and a block is left out only by a directive that says why."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.doc_snippets import PAGE_DATABASE, PAGES, ROOT, snippets

pytest_plugins = ["pytester"]


def test_every_page_has_blocks_and_every_left_out_one_says_why() -> None:
    for page in PAGES:
        blocks = snippets(page)
        assert blocks, f"{page} has no Python block"
        for block in blocks:
            assert block.mode in ("run", "pytest") or block.reason, block.where


@pytest.mark.parametrize("page", PAGES)
def test_the_page_runs(
    page: str,
    db_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    pytester: pytest.Pytester,
) -> None:
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    monkeypatch.syspath_prepend(str(ROOT))  # `examples` as from a checkout
    monkeypatch.setenv("DATABASE_URL", db_url)
    namespace: dict[str, Any] = {"__name__": f"snippets_{Path(page).stem.replace('-', '_')}"}
    for block in snippets(page):
        code = block.code.replace(PAGE_DATABASE, db_url)
        if block.mode == "run":
            try:
                exec(compile(code, block.where, "exec"), namespace)
            except Exception as exc:
                raise AssertionError(f"the block at {block.where} failed: {exc!r}") from exc
        elif block.mode == "pytest":
            pytester.makeini(f"[pytest]\nkongtask_database_url = {db_url}\n")
            name = f"test_snippet_{block.line}"
            module = pytester.makepyfile(**{name: code})
            result = pytester.runpytest_subprocess(
                "-p", "no:cacheprovider", "-q", str(module), timeout=120
            )
            assert result.ret == 0, f"the pytest block at {block.where} failed"
            assert result.parseoutcomes().get("passed", 0) >= 1, block.where
    assert os.environ["DATABASE_URL"] == db_url
