"""The base of actor messages that carry nothing but their type (``Stop``, ``Beat``, ``Probe``...).

A frozen dataclass without fields would do, but generating its methods costs
1.5 to 2 ms per class at import on a slow 2-core machine, and a worker imports a
dozen such messages before its first job: the restart of a killed worker waits
for them. :class:`Fieldless` gives the same behaviour (immutable, equal to every
instance of its own class and only those, hashable, ``Stop()`` as repr, matched
by ``case Stop():``) with methods defined once.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = ["Fieldless"]


class Fieldless:
    """A message without fields. Each subclass declares ``__slots__ = ()`` too, so that
    its instances have no attributes to set, as a frozen dataclass's have none."""

    __slots__ = ()
    __match_args__: ClassVar[tuple[str, ...]] = ()

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return True
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.__class__)

    def __repr__(self) -> str:
        return f"{self.__class__.__qualname__}()"
