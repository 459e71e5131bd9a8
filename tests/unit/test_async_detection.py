"""Which handlers run on the event loop: ``async def`` functions, declared or not, and
objects whose ``__call__`` is one."""

from __future__ import annotations

import functools
from typing import Any

import pytest

import kongtask
from kongtask import ConfigurationError
from kongtask.jobs.aio import is_async_handler
from kongtask.jobs.quarantine import CrashGuard


async def coro(payload: Any, helpers: Any) -> None:
    return None


def plain(payload: Any, helpers: Any) -> None:
    return None


class AsyncCallable:
    async def __call__(self, payload: Any, helpers: Any) -> None:
        return None


class PlainCallable:
    def __call__(self, payload: Any, helpers: Any) -> None:
        return None


def test_async_handlers_are_told_from_plain_ones() -> None:
    for handler in (coro, kongtask.task(coro), functools.partial(coro), AsyncCallable()):
        assert is_async_handler(handler), handler
    for handler in (plain, kongtask.task(plain), functools.partial(plain), PlainCallable()):
        assert not is_async_handler(handler), handler


def test_the_crash_guard_keeps_an_async_handler_async() -> None:
    guard = CrashGuard()
    assert is_async_handler(guard.wrap("coro", coro))
    assert is_async_handler(guard.wrap("coro", kongtask.task(coro)))
    assert is_async_handler(guard.wrap("call", AsyncCallable()))
    assert not is_async_handler(guard.wrap("plain", plain))


def test_an_async_handler_cannot_be_isolated() -> None:
    guard = CrashGuard()
    for options in ({"isolate": True}, {"executor": "process"}):
        with pytest.raises(ConfigurationError, match="async def handler"):
            guard.wrap("coro", kongtask.task(**options)(coro))
