"""Lazy package exports: a package's public names are imported on first use.

``import kongtask`` (and every ``kongtask.x.y`` import, which runs the
package's ``__init__`` first) used to import the whole library: the cron
parser and scheduler, the ops tools and worker utilities, whatever the
process needed. A worker without a crontab needs none of the cron stack, and
a worker's start-up is time another pool's jobs wait, so the package
``__init__`` modules name where each export lives and :func:`exports` loads
it when it is first read (PEP 562). Type checkers and the API reference read
the same names from the ``if TYPE_CHECKING:`` imports beside the table;
``tests/unit/test_lazy_exports.py`` keeps the two equal.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["exports"]


def exports(
    package: str, table: Mapping[str, tuple[str, ...]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``, whose names ``table`` lists
    by module (``{"kongtask.runner": ("Runner", "run"), ...}``)."""
    where = {name: module for module, names in table.items() for name in names}
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # later reads find it without this hook
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(where))

    return __getattr__, __dir__
