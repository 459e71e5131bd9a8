"""What a child process can import, how children run and die, and the pools' lock keys."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from datetime import UTC, datetime
from typing import Any

import pytest

import kongtask
from kongtask.errors import ConfigurationError
from kongtask.job import Job
from kongtask.jobs.child_main import load_handler, run_job
from kongtask.jobs.isolation import ChildCrashed, Children, HandlerRef, describe_exit
from kongtask.jobs.liveness import pool_lock_key
from kongtask.jobs.quarantine import CrashGuard
from kongtask.jobs.zygote import supported as zygote_supported


def top_level(payload: Any, helpers: Any) -> Any:
    return ["fine", ValueError("item failed")]


async def top_level_async(payload: Any, helpers: Any) -> Any:
    await asyncio.sleep(0)
    return {"doubled": payload * 2, "job": helpers.job.id}


@kongtask.task(isolate=True)
def declared_isolated(payload: Any, helpers: Any) -> Any:
    return payload


def test_a_top_level_handler_is_found_again_by_module_path() -> None:
    ref = HandlerRef.of(top_level)
    assert ref.as_tuple()[:2] == (__name__, "top_level")
    assert load_handler(*ref.as_tuple()) is top_level
    # A Task is found by its declared name and gives its function.
    assert load_handler(*HandlerRef.of(declared_isolated).as_tuple()) is declared_isolated.fn


def test_a_batch_result_comes_back_with_failed_items_marked() -> None:
    outcome = run_job(HandlerRef.of(top_level).as_tuple(), [1, 2], {"id": 7}, "w", "")
    assert outcome[0] == "ok"
    assert outcome[1][0] == "fine"
    assert outcome[1][1][1] == "item failed"


def test_an_async_handler_is_run_to_its_result_in_the_child() -> None:
    outcome = run_job(HandlerRef.of(top_level_async).as_tuple(), 21, {"id": 8}, "w", "")
    assert outcome == ("ok", {"doubled": 42, "job": 8})


def test_handlers_a_child_cannot_import_are_refused_with_their_name() -> None:
    def local(payload: Any, helpers: Any) -> None:
        return None

    guard = CrashGuard()
    with pytest.raises(
        ConfigurationError, match=r"task 'inner' \(isolate=True\).*inside a function"
    ):
        guard.wrap("inner", kongtask.Task(fn=local, name="inner", isolate=True))
    with pytest.raises(ConfigurationError, match=r"task 'lam' \(executor='process'\).*lambda"):
        guard.wrap("lam", kongtask.Task(fn=lambda p, h: None, name="lam", executor="process"))
    # A plain handler that cannot be imported is not refused: its suspects run in the worker.
    assert HandlerRef.maybe(local) is None
    guard.wrap("plain", local)
    guard.close()


def test_exit_descriptions_name_the_signal_or_the_code() -> None:
    assert describe_exit(-11) == "killed by SIGSEGV"
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(77) == "exited with code 77 before answering"


def test_lock_keys_are_stable_signed_64_bit_and_distinct() -> None:
    key = pool_lock_key("pool-0123456789abcdef01")
    assert key == pool_lock_key("pool-0123456789abcdef01")
    assert -(2**63) <= key < 2**63
    assert key != pool_lock_key("pool-0123456789abcdef02")


def _job(job_id: int) -> Job:
    now = datetime.now(UTC)
    return Job(
        id=job_id, job_queue_id=None, task_id=1, task_identifier="t", payload={}, priority=0,
        run_at=now, attempts=1, max_attempts=25, last_error=None, created_at=now,
        updated_at=now, key=None, locked_at=now, locked_by="pool-1", revision=0, flags=None,
        is_available=True,
    )  # fmt: skip


def echo_pid(payload: Any, helpers: Any) -> Any:
    return [os.getpid(), helpers.job.id, payload]


def exit_hard(payload: Any, helpers: Any) -> Any:
    os._exit(3)


def test_children_are_reused_and_one_that_died_idle_is_not_blamed() -> None:
    children = Children(keep=1)
    never = threading.Event()
    try:
        ref = HandlerRef.of(echo_pid)
        pid, job_id, payload = children.run(ref, {"a": 1}, _job(5), "w", "", never, reuse=True)
        assert (job_id, payload) == (5, {"a": 1}) and pid != os.getpid()
        # The same child runs the next suspect.
        assert children.run(ref, None, _job(6), "w", "", never, reuse=True)[0] == pid
        # Killed while idle: the next run gets a fresh child and succeeds.
        os.kill(pid, signal.SIGKILL)
        again = children.run(ref, None, _job(7), "w", "", never, reuse=True)[0]
        assert again != pid
        # A child that dies running a job is that job's crash, named by its exit code.
        with pytest.raises(ChildCrashed, match="exited with code 3"):
            children.run(HandlerRef.of(exit_hard), None, _job(8), "w", "", never, reuse=True)
    finally:
        children.close()


def niceness_and_parent(payload: Any, helpers: Any) -> Any:
    return [os.nice(0), os.getppid()]


@pytest.mark.skipif(not zygote_supported(), reason="the zygote needs Linux")
def test_children_are_forked_by_one_zygote_and_run_at_the_niceness_asked() -> None:
    children = Children(keep=0)
    never = threading.Event()
    base = os.nice(0)
    try:
        ref = HandlerRef.of(niceness_and_parent)
        plain = children.run(ref, None, _job(1), "w", "", never, reuse=False)
        lowered = children.run(ref, None, _job(2), "w", "", never, reuse=False, niceness=5)
        # Both were forked by the same process (the zygote), not by this one.
        assert plain[1] == lowered[1] != os.getpid()
        assert (plain[0], lowered[0]) == (base, min(19, base + 5))
        # A child killed by a signal is described by its signal, through the zygote.
        with pytest.raises(ChildCrashed, match="SIGKILL"):
            children.run(HandlerRef.of(kill_self), None, _job(3), "w", "", never, reuse=False)
        # With the zygote gone, the next child is a fresh interpreter and runs the job.
        os.kill(plain[1], signal.SIGKILL)
        again = children.run(ref, None, _job(4), "w", "", never, reuse=False)
        assert again[1] == os.getpid()
    finally:
        children.close()


def kill_self(payload: Any, helpers: Any) -> Any:
    os.kill(os.getpid(), signal.SIGKILL)
