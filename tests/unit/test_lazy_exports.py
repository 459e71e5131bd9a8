"""The packages' lazy exports: the table, the TYPE_CHECKING imports and ``__all__``
agree, every name resolves to its module's object, and a worker's imports leave
the cron stack out."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import kongtask

PACKAGES = ["kongtask", "kongtask.cron"]


def _declared(package: str) -> tuple[dict[str, str], dict[str, str], set[str]]:
    """From the package's source: the names its TYPE_CHECKING block imports (name to
    module), the names its lazy table lists (name to module), and the eager names."""
    module = importlib.import_module(package)
    assert module.__file__ is not None
    tree = ast.parse(Path(module.__file__).read_text())
    typed: dict[str, str] = {}
    table: dict[str, str] = {}
    eager: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for inner in node.body:
                assert isinstance(inner, ast.ImportFrom) and inner.module is not None
                typed.update({alias.name: inner.module for alias in inner.names})
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            eager.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            call = node.value
            if ast.unparse(call.func) == "_lazy.exports":
                listed = ast.literal_eval(call.args[1])
                table = {name: mod for mod, names in listed.items() for name in names}
    return typed, table, eager


@pytest.mark.parametrize("package", PACKAGES)
def test_table_type_checking_imports_and_all_agree(package: str) -> None:
    typed, table, eager = _declared(package)
    assert table == typed
    public = set(importlib.import_module(package).__all__)
    assert set(table) | (eager & public) == public
    assert not set(table) & eager


@pytest.mark.parametrize("package", PACKAGES)
def test_every_export_is_its_module_s_object(package: str) -> None:
    _, table, _ = _declared(package)
    module = importlib.import_module(package)
    for name, source in table.items():
        assert getattr(module, name) is getattr(importlib.import_module(source), name), name
    assert set(table) <= set(dir(module))


def test_an_unknown_name_is_an_attribute_error_naming_it() -> None:
    with pytest.raises(AttributeError, match="module 'kongtask' has no attribute 'Nope'"):
        kongtask.Nope  # type: ignore[attr-defined]  # noqa: B018
    assert not hasattr(kongtask.cron, "nothing_here")


def _modules_after(code: str, prefix: str = "kongtask") -> set[str]:
    """The modules (named ``prefix``…) a fresh interpreter has imported after ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True
    ).stdout
    return {name for name in json.loads(out) if name.startswith(prefix)}


def test_a_worker_without_a_crontab_imports_no_cron_stack() -> None:
    loaded = _modules_after("import kongtask.runner, kongtask.ops.cli.main")
    assert "kongtask.runner" in loaded
    cron_stack = {
        "kongtask.cron.parser",
        "kongtask.cron.index",
        "kongtask.cron.source",
        "kongtask.cron.service.scheduling",
        "kongtask.scheduler",
        "kongtask.worker_utils",
    }
    assert not loaded & cron_stack, loaded & cron_stack
    # Nor what only some runs use: the embedded server, the process pool.
    assert "kongtask.db.embedded" not in loaded
    assert "multiprocessing" not in _modules_after("import kongtask.runner", prefix="")


def test_star_import_and_first_use_load_the_names() -> None:
    loaded = _modules_after("from kongtask import *\nassert Scheduler and parse_crontab")
    assert {"kongtask.scheduler", "kongtask.cron.parser"} <= loaded
