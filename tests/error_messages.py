"""Collect the template of every error message kongtask raises or prints on purpose, from its code.

Read by AST, never by running anything: each ``raise SomeError(message, ...)``
whose class descends from ``kongtask.errors.KongtaskError``, and each command's
``parser.error(message)``, gives one template,
the message's fixed text with ``{…}`` where a value goes. A message held in a
module constant, a local variable or built by a function of the same module is
followed there; a re-raised message (``raise CrontabError(error.message)``) is
the other error's and is skipped.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kongtask"
PLACEHOLDER = "{…}"


@dataclass(frozen=True)
class Template:
    """One raise site: where it is, the class raised and its message template (None: unread)."""

    where: str
    error: str
    text: str | None

    def fragments(self) -> list[str]:
        """The fixed pieces of the message worth looking for (4 or more letters or digits)."""
        assert self.text is not None
        pieces = (piece.strip() for piece in self.text.split(PLACEHOLDER))
        return [piece for piece in pieces if len(re.sub(r"\W", "", piece)) >= 4]


def _error_classes(trees: dict[Path, ast.Module]) -> set[str]:
    """Names of every class in the package descending from KongtaskError."""
    bases: dict[str, set[str]] = {}
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                names = {
                    b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases
                }
                bases.setdefault(node.name, set()).update(names)
    found = {"KongtaskError"}
    while True:
        more = {name for name, of in bases.items() if of & found} - found
        if not more:
            return found
        found |= more


def _text(node: ast.AST) -> str | None:
    """The template of a string expression, or None when it is not one."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else PLACEHOLDER for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return (_text(node.left) or PLACEHOLDER) + (_text(node.right) or PLACEHOLDER)
    return None


def _assigned(scope: ast.AST, name: str) -> list[ast.AST]:
    """Values assigned to ``name`` (plain or augmented) anywhere in ``scope``."""
    values: list[ast.AST] = []
    for node in ast.walk(scope):
        if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                values.append(node.value)
    return values


def _resolve(arg: ast.AST, scope: ast.AST, tree: ast.Module) -> list[str] | None:
    """Templates a message argument can take: [] for a re-raise, None when unreadable."""
    text = _text(arg)
    if text is not None:
        return [text]
    if isinstance(arg, ast.Attribute):  # another error's message, raised again
        return []
    if isinstance(arg, ast.Name):
        for where in (scope, tree):
            values = [t for v in _assigned(where, arg.id) if (t := _text(v)) is not None]
            if values:
                return values
        return None
    if isinstance(arg, ast.Call):
        if isinstance(arg.func, ast.Attribute) and _text(arg.func.value) is not None:
            return [_text(arg.func.value) or ""]  # f"...".rstrip()
        for inner in arg.args:  # a wrapper such as redact(f"...")
            text = _text(inner)
            if text is not None:
                return [text]
        func = arg.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == name:
                found: list[str] = []
                for ret in (n for n in ast.walk(node) if isinstance(n, ast.Return)):
                    if ret.value is not None:
                        found += _resolve(ret.value, node, tree) or []
                return found or None
    return None


def _message_call(node: ast.AST, errors: set[str]) -> tuple[ast.Call | None, str]:
    """``raise SomeError(message)`` of a KongtaskError class, or a command's
    ``parser.error(message)`` (argparse prints it with the usage and exits with
    status 2): the call, and what it raises."""
    if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
        func = node.exc.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
        if name in errors:
            return node.exc, name
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "error"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id.endswith("parser")
        and node.args
    ):
        return node, "usage error"
    return None, ""


def collect(package: Path = PACKAGE) -> list[Template]:
    """Every message kongtask raises (a KongtaskError class) or prints as a usage error
    (``parser.error``) in ``package``, with its template(s)."""
    trees = {
        path: ast.parse(path.read_text(encoding="utf-8")) for path in sorted(package.rglob("*.py"))
    }
    errors_module = PACKAGE / "errors.py"  # kongtask's own classes, also for another tree
    errors = _error_classes({**trees, errors_module: ast.parse(errors_module.read_text("utf-8"))})
    templates: list[Template] = []
    for path, tree in trees.items():
        scopes = [
            n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        ]
        for node in ast.walk(tree):
            call, name = _message_call(node, errors)
            if call is None:
                continue
            scope = next(
                (
                    s
                    for s in scopes
                    if s.lineno <= node.lineno <= (s.end_lineno or s.lineno)
                    and not any(
                        i is not s and s.lineno < i.lineno <= node.lineno <= (i.end_lineno or 0)
                        for i in scopes
                    )
                ),
                tree,
            )
            where = f"{path.relative_to(package.parent)}:{node.lineno}"
            texts = _resolve(call.args[0], scope, tree)
            if texts is None:
                templates.append(Template(where, name, None))
            templates += [Template(where, name, text) for text in texts or []]
    return templates


def normalise(text: str) -> str:
    """Whitespace collapsed, so a message may wrap in the page."""
    return " ".join(text.split())
