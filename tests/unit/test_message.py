"""Fieldless messages behave as frozen dataclasses without fields do."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import kongtask
from kongtask.jobs.liveness import Beat, Check
from kongtask.runtime.control import Kill, Stop
from kongtask.runtime.message import Fieldless


def test_equal_to_its_own_class_only() -> None:
    assert Stop() == Stop()
    assert Stop() != Kill()
    assert Beat() != Check()
    assert Stop() != ()
    assert hash(Stop()) == hash(Stop())
    assert len({Stop(), Stop(), Kill()}) == 2


def test_repr_and_match() -> None:
    assert repr(Stop()) == "Stop()"

    def kind(message: object) -> str:
        match message:
            case Stop():
                return "stop"
            case Kill():
                return "kill"
            case _:
                return "other"

    assert [kind(Stop()), kind(Kill()), kind(Beat())] == ["stop", "kill", "other"]


def test_immutable() -> None:
    with pytest.raises(AttributeError):
        Stop().reason = "x"  # type: ignore[attr-defined]


def _subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub, *_subclasses(sub)}
    return found


def test_every_fieldless_message_declares_empty_slots() -> None:
    """A subclass without ``__slots__ = ()`` would get a ``__dict__`` and take attributes."""
    for info in pkgutil.walk_packages(kongtask.__path__, "kongtask."):
        if ".contrib." in info.name or ".dashboard" in info.name or info.name.endswith("__main__"):
            continue
        importlib.import_module(info.name)
    messages = _subclasses(Fieldless)
    assert len(messages) >= 14
    for message in messages:
        assert message.__dict__.get("__slots__") == (), message.__qualname__
        assert not hasattr(message(), "__dict__"), message.__qualname__
