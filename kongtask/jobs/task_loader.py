"""Load task handlers for the CLI from a Python file, a dotted module or a folder.

- A file or module: its ``tasks`` mapping (identifier -> callable) or list
  of declared tasks if it has one, else its public top-level functions, each
  under its own name, and the declared tasks (``@kongtask.task``) made in it,
  each under its declared name.
- A folder: every ``.py`` file below it that defines a callable ``task``;
  the identifier is the path relative to the folder without ``.py``, with
  nested folders joined by ``/`` (as graphile-worker names nested tasks); a
  declared ``task`` must be declared under that identifier.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from kongtask.declared import declared
from kongtask.errors import TaskLoadError

__all__ = ["default_tasks_path", "load_tasks", "load_worker_tasks"]

TaskMap = dict[str, Callable[..., Any]]

# Same character rules as graphile-worker's task folders and files.
_NAME_PART = re.compile(r"^[A-Za-z0-9_-]+$")
_DOTTED_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def default_tasks_path(cwd: Path | None = None) -> str | None:
    """``./tasks`` (a folder) or ``./tasks.py`` when present, else ``None``."""
    base = cwd or Path.cwd()
    for candidate in (base / "tasks", base / "tasks.py"):
        if candidate.exists():
            return str(candidate)
    return None


_NO_TASKS_HINT = (
    "give --tasks PATH (for a cron node without tasks: kongtask cron run --crontab FILE)"
)


def load_worker_tasks(spec: str | None, cwd: Path | None = None) -> TaskMap:
    """The tasks of a ``kongtask`` worker: ``spec``, else ``./tasks`` or ``./tasks.py``.

    Finding none is an error that says where it looked: a worker with nothing
    to run would only poll for ever (graphile-worker, too, refuses to start
    without its tasks folder).
    """
    path = spec or default_tasks_path(cwd)
    if path is None:
        base = cwd or Path.cwd()
        raise TaskLoadError(
            f"no tasks found: looked for {base / 'tasks'} (a folder) and {base / 'tasks.py'}; "
            + _NO_TASKS_HINT
        )
    tasks = load_tasks(path)
    if not tasks:
        if Path(path).is_dir():
            what = f"no .py file defining 'task' in {path}"
        else:
            what = f"{path} defines no tasks (neither 'tasks' entries nor public functions)"
        raise TaskLoadError(f"no tasks found: {what}; {_NO_TASKS_HINT}")
    return tasks


def load_tasks(spec: str) -> TaskMap:
    """Load task handlers from ``spec`` (a path or a dotted module name)."""
    path = Path(spec)
    if path.is_dir():
        return _load_folder(path)
    if path.suffix == ".py" or path.exists():
        if not path.is_file():
            raise TaskLoadError(f"tasks file {spec!r} does not exist")
        return _tasks_of_module(_import_file(path, f"kongtask_tasks_{_safe(path.stem)}"), spec)
    if _DOTTED_MODULE.match(spec):
        try:
            module = importlib.import_module(spec)
        except ImportError as exc:
            raise TaskLoadError(f"could not import tasks module {spec!r}: {exc}") from exc
        return _tasks_of_module(module, spec)
    raise TaskLoadError(f"--tasks {spec!r} is neither a file, a folder nor a module name")


def _safe(text: str) -> str:
    return re.sub(r"\W", "_", text)


def _import_file(path: Path, module_name: str) -> ModuleType:
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise TaskLoadError(f"cannot load tasks from {str(path)!r}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise TaskLoadError(_import_failure(path, exc)) from exc
    return module


def _import_failure(path: Path, exc: Exception) -> str:
    """One line naming the file, the line and the error, as Python's own report would.

    A syntax error names the file it is in (perhaps a module the tasks file
    imports); any other error names the line of the tasks file that raised it.
    """
    where = f'tasks file "{path}"'
    if isinstance(exc, SyntaxError):
        line = f", line {exc.lineno}" if exc.lineno else ""
        if exc.filename and Path(exc.filename).resolve() != path.resolve():
            return f'"{exc.filename}"{line} (imported by {where}): {exc.msg} ({type(exc).__name__})'
        return f"{where}{line}: {exc.msg} ({type(exc).__name__})"
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [frame for frame in frames if Path(frame.filename).resolve() == path.resolve()]
    line = f", line {ours[-1].lineno}" if ours else ""
    message = " ".join(str(exc).split())
    return f"{where}{line}: {type(exc).__name__}" + (f": {message}" if message else "")


def _tasks_of_module(module: ModuleType, origin: str) -> TaskMap:
    listed = getattr(module, "tasks", None)
    if listed is not None:
        return _listed_tasks(listed, origin)
    tasks: TaskMap = {}
    found: dict[str, str] = {}  # task name -> the module attribute that gave it
    for attribute, value in vars(module).items():
        if attribute.startswith("_"):
            continue
        declaration = declared(value)
        if declaration is not None:
            # A declared task made in this module, under its declared name.
            if getattr(declaration.fn, "__module__", None) != module.__name__:
                continue
            name = declaration.name
        elif inspect.isfunction(value) and value.__module__ == module.__name__:
            name = attribute
        else:
            continue
        if name in found:
            raise TaskLoadError(
                f"{origin}: {attribute!r} and {found[name]!r} both define task {name!r}"
            )
        found[name] = attribute
        tasks[name] = value
    return tasks


def _listed_tasks(listed: object, origin: str) -> TaskMap:
    """A module's ``tasks``: a mapping identifier -> handler, or a list of declared tasks."""
    tasks: TaskMap = {}
    if isinstance(listed, Mapping):
        for identifier, handler in listed.items():
            if not isinstance(identifier, str) or not identifier:
                raise TaskLoadError(f"{origin}: task identifier {identifier!r} is not a string")
            if not callable(handler):
                raise TaskLoadError(f"{origin}: task {identifier!r} is not callable")
            declaration = declared(handler)
            if declaration is not None and declaration.name != identifier:
                raise TaskLoadError(
                    f"{origin}: 'tasks' maps {identifier!r} to the declared task "
                    f"{declaration.name!r}; use its declared name as the key"
                )
            tasks[identifier] = handler
        return tasks
    if isinstance(listed, list | tuple):
        for index, item in enumerate(listed):
            declaration = declared(item)
            if declaration is None:
                raise TaskLoadError(
                    f"{origin}: tasks[{index}] is not a declared task (@kongtask.task); "
                    "'tasks' must be a mapping of identifier -> callable or a list of "
                    "declared tasks"
                )
            if declaration.name in tasks:
                raise TaskLoadError(
                    f"{origin}: tasks[{index}] declares task {declaration.name!r} a second time"
                )
            tasks[declaration.name] = declaration
        return tasks
    raise TaskLoadError(
        f"{origin}: 'tasks' must be a mapping of identifier -> callable or a list of declared tasks"
    )


def _load_folder(folder: Path) -> TaskMap:
    tasks: TaskMap = {}
    for file in sorted(folder.rglob("*.py")):
        relative = file.relative_to(folder).with_suffix("")
        parts = relative.parts
        if any(part.startswith(("_", ".")) for part in parts):
            continue
        if not all(_NAME_PART.match(part) for part in parts):
            raise TaskLoadError(
                f"task file {str(file)!r}: folder and file names may only contain "
                "letters, digits, '_' and '-'"
            )
        identifier = "/".join(parts)
        module = _import_file(file, "kongtask_tasks_" + _safe(identifier))
        handler = getattr(module, "task", None)
        if handler is None:
            raise TaskLoadError(f"task file {str(file)!r} does not define a 'task' function")
        if not callable(handler):
            raise TaskLoadError(f"task file {str(file)!r}: 'task' is not callable")
        declaration = declared(handler)
        if declaration is not None and declaration.name != identifier:
            raise TaskLoadError(
                f"task file {str(file)!r} declares task {declaration.name!r}, but a file "
                f"here is task {identifier!r}: declare it with "
                f"@kongtask.task(name={identifier!r})"
            )
        tasks[identifier] = handler
    return tasks
